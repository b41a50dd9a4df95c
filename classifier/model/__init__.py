"""The network (a plain nn.Module around a timm backbone), its losses and test-time augmentation, the LightningModule
that trains it, and checkpoint files."""
