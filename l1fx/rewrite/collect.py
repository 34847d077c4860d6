"""The libcst visitor that finds the call sites a source rewrite considers, with their names and notes.

Which calls count comes from the layer registry (:func:`l1fx.layers.source_table` and
:func:`l1fx.layers.l1_source_names`), read when a rewrite starts (:meth:`Tables.current`), so a kind
registered by a plug-in is rewritten like the built-in ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import libcst as cst
from libcst.metadata import ImportAssignment, PositionProvider, QualifiedNameProvider, ScopeProvider

from l1fx import layers

from .results import NOT_VISIBLE, Note

__all__ = ["Tables", "Site", "Collector", "FACTORY_HINTS"]

# Text that may build a layer through a factory (MONAI's ``Conv[Conv.CONV, 3]``, ``getattr(nn, f"Conv{d}d")``):
# a file spelling one is searched even when it names no layer class.
FACTORY_HINTS = ("Conv", "Linear", "getattr(nn", "getattr(torch.nn")
_LAYER_WORDS = ("Conv", "Linear")
_TORCH_NAMESPACES = frozenset({"torch.nn", "torch.nn.functional", "torch", "torch.nn.modules"})
_CONVERT_HINT = "a source rewrite cannot change it: convert the built model with l1fx.convert(model)"


@dataclass(frozen=True)
class Tables:
    """The qualified names a rewrite looks for, from the layer registry."""

    dense: dict[str, str]  # qualified dense name -> qualified l1 replacement
    l1: frozenset[str]  # calls already l1: candidates (so a second run selects the same) but never changed
    known: frozenset[str]  # both
    leaves: frozenset[str]  # their last components: a file that spells none of them has no call site

    @classmethod
    def current(cls) -> "Tables":
        dense, l1 = layers.source_table(), layers.l1_source_names()
        known = frozenset(dense) | l1
        return cls(dense, l1, known, frozenset(n.rsplit(".", 1)[-1] for n in known))


@dataclass
class Site:
    node: cst.Call
    line: int
    column: int
    callee: str
    dense: str
    l1: str
    targets: tuple[str, ...]
    scope: str
    clash: Optional[tuple[int, int]]  # where the l1 name's package (``l1fx``) is bound to something else


class Collector(cst.CSTVisitor):
    """Finds candidate calls (source order), their targets and scopes, and notes."""

    METADATA_DEPENDENCIES = (QualifiedNameProvider, PositionProvider, ScopeProvider)

    def __init__(self, module: cst.Module, tables: Tables):
        super().__init__()
        self.module = module
        self.tables = tables
        self.sites: list[Site] = []
        self.notes: list[Note] = []
        self._scope: list[str] = []
        self._targets: list[tuple[str, ...]] = []
        self._callees: set[int] = set()
        self._paired: dict[int, str] = {}  # id(value element) -> its target in a tuple assignment
        self._typechecks: set[int] = set()  # names/attributes that are base classes or isinstance arguments

    # --- context
    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._scope.append(node.name.value)
        for base in node.bases:
            self._mark_typecheck(base.value)

    def _mark_typecheck(self, expr: cst.CSTNode) -> None:
        """Names in ``expr`` are type checks (a base class, an ``isinstance`` argument), not factories."""
        marks = self._typechecks

        class _Mark(cst.CSTVisitor):
            def visit_Name(self, n: cst.Name) -> None:
                marks.add(id(n))

            def visit_Attribute(self, n: cst.Attribute) -> None:
                marks.add(id(n))

        expr.visit(_Mark())

    def leave_ClassDef(self, node: cst.ClassDef) -> None:
        self._scope.pop()

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._scope.append(node.name.value)

    def leave_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._scope.pop()

    def _push_targets(self, exprs: Iterable[cst.BaseExpression]) -> None:
        names: list[str] = []
        for e in exprs:
            elements = e.elements if isinstance(e, (cst.Tuple, cst.List)) else None
            for t in ([el.value for el in elements] if elements is not None else [e]):
                names.append(self.module.code_for_node(t).strip())
        self._targets.append(tuple(names))

    def visit_Assign(self, node: cst.Assign) -> None:
        self._push_targets(t.target for t in node.targets)
        # ``self.a, self.b = nn.Linear(..), nn.Linear(..)``: each element gets its own target.
        target = node.targets[0].target if len(node.targets) == 1 else None
        if isinstance(target, (cst.Tuple, cst.List)) and isinstance(node.value, (cst.Tuple, cst.List)) \
                and len(target.elements) == len(node.value.elements):
            for t, v in zip(target.elements, node.value.elements):
                self._paired[id(v)] = self.module.code_for_node(t.value).strip()

    def leave_Assign(self, node: cst.Assign) -> None:
        self._targets.pop()

    def visit_Element(self, node: cst.Element) -> None:
        if id(node) in self._paired:
            self._targets.append((self._paired[id(node)],))

    def leave_Element(self, node: cst.Element) -> None:
        if id(node) in self._paired:
            self._targets.pop()

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        self._push_targets([node.target])

    def leave_AnnAssign(self, node: cst.AnnAssign) -> None:
        self._targets.pop()

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        self._push_targets([node.target])

    def leave_AugAssign(self, node: cst.AugAssign) -> None:
        self._targets.pop()

    def visit_NamedExpr(self, node: cst.NamedExpr) -> None:
        self._push_targets([node.target])

    def leave_NamedExpr(self, node: cst.NamedExpr) -> None:
        self._targets.pop()

    # Imports and annotations mention the classes without using them.
    def visit_Import(self, node: cst.Import) -> bool:
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        source = self.module.code_for_node(node.module) if node.module is not None else ""
        if isinstance(node.names, cst.ImportStar) and source.split(".")[0] == "torch":
            line, col = self._where(node)
            self.notes.append(Note(line, col, f"'from {source} import *' hides where names come from; calls "
                                              "through it are not rewritten (import the names you use instead)"))
        return False

    def visit_Annotation(self, node: cst.Annotation) -> bool:
        return False

    # --- calls and references
    def _qualified(self, node: cst.CSTNode) -> set[str]:
        return {q.name for q in self.get_metadata(QualifiedNameProvider, node, set())}

    def _where(self, node: cst.CSTNode) -> tuple[int, int]:
        start = self.get_metadata(PositionProvider, node).start
        return start.line, start.column + 1

    def visit_Call(self, node: cst.Call) -> None:
        names = self._qualified(node.func)
        if names & {"builtins.isinstance", "builtins.issubclass"} and len(node.args) == 2:
            self._mark_typecheck(node.args[1].value)
        known = names & self.tables.known
        if not known:
            self._factory_call(node)
            return
        self._callees.add(id(node.func))
        line, col = self._where(node)
        callee = self.module.code_for_node(node.func)
        if known != names:
            self.notes.append(Note(line, col, f"{callee} may be {sorted(known)[0]} or something else "
                                              f"(it is bound more than once); left alone"))
            return
        if known <= self.tables.l1:
            dense, l1 = "", sorted(known)[0]
        else:
            l1s = {self.tables.dense.get(n) for n in known}
            if len(l1s) != 1 or None in l1s:
                self.notes.append(Note(line, col, f"{callee} may be any of {sorted(known)}; left alone"))
                return
            dense, l1 = sorted(known)[0], l1s.pop()
        targets = self._targets[-1] if self._targets else ()
        self.sites.append(Site(node, line, col, callee, dense, l1, targets, ".".join(self._scope),
                               self._clash(node, l1.split(".", 1)[0])))

    def _factory_call(self, node: cst.Call) -> None:
        """A layer built by a factory: ``getattr(nn, name)(...)``, ``Conv[Conv.CONV, 3](...)`` (MONAI)."""
        func = node.func
        what = None
        if isinstance(func, cst.Call) and self._qualified(func.func) & {"builtins.getattr"} and func.args \
                and self._qualified(func.args[0].value) & _TORCH_NAMESPACES:
            what = "builds a torch layer from a name computed at run time"
        elif isinstance(func, cst.Subscript):
            base = self.module.code_for_node(func.value).rsplit(".", 1)[-1]
            if any(w in base for w in _LAYER_WORDS):
                what = "calls what a layer factory returns (MONAI style), a class the source does not name"
        if what is not None:
            line, col = self._where(node)
            self.notes.append(Note(line, col, f"{self.module.code_for_node(func)}(...) {what}; the layer is "
                                              f"{NOT_VISIBLE}, so {_CONVERT_HINT}", NOT_VISIBLE))

    def _clash(self, node: cst.Call, package: str) -> Optional[tuple[int, int]]:
        """The rewritten call says ``l1fx.…`` (``package.…``): find a binding that makes it mean something else."""
        for assignment in self.get_metadata(ScopeProvider, node)[package]:
            binder = getattr(assignment, "node", None)
            if isinstance(assignment, ImportAssignment) and isinstance(binder, cst.Import) and not any(
                    alias.asname is not None and alias.evaluated_alias == package for alias in binder.names):
                continue  # ``import l1fx`` / ``import l1fx.nn``
            return self._where(binder) if binder is not None else (0, 0)
        return None

    def _reference(self, node: Union[cst.Name, cst.Attribute]) -> Optional[bool]:
        if id(node) in self._callees:
            return None
        dense = self._qualified(node) & self.tables.dense.keys()
        if dense:
            line, col = self._where(node)
            name = sorted(dense)[0]
            written = self.module.code_for_node(node)
            kind = ""
            if id(node) in self._typechecks:
                why = "used but not called (base class, isinstance check); left as is, and isinstance checks " \
                      "against it do not match l1fx layers"
            elif name.rsplit(".", 1)[1][0].isupper():  # a class chosen or passed here, called elsewhere
                why = (f"used but not called here (bound to a name, passed as a factory argument...): the layers "
                       f"it builds are {NOT_VISIBLE}, so {_CONVERT_HINT}")
                kind = NOT_VISIBLE
            else:
                why = "used but not called (passed as a function...); left as is"
            self.notes.append(Note(line, col, f"{written} ({name}) {why}", kind))
            return False
        return None

    def visit_Name(self, node: cst.Name) -> Optional[bool]:
        return self._reference(node)

    def visit_Attribute(self, node: cst.Attribute) -> Optional[bool]:
        return self._reference(node)
