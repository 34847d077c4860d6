"""torch.fx passes of l1fx (installed as ``l1fx.passes``)."""
