"Helpers shared by the test files."
import logging

def save_checkpoint(module, path):
    "Write a Lightning checkpoint of `module` (untrained is fine) to `path`, as `Trainer.save_checkpoint` does after training."
    import lightning as L
    logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator='cpu')
    trainer.strategy.connect(module); trainer.save_checkpoint(path)
    return path

def tiny_checkpoint(path):
    "A small untrained 2.5D `SegModule` checkpoint whose head predicts tumour everywhere (its files and grids are what tests check)."
    import torch
    from lung_tumor_seg.training import SegModule
    module = SegModule(context_slices=1, model=dict(base_width=4, depth=2), preprocess=dict(window='lung', image_size=[32, 32], slab='all'))
    with torch.no_grad(): module.net.head.weight.zero_(); module.net.head.bias.fill_(5.0)
    return save_checkpoint(module, path)

def threshold_model():
    "Stand-in model: logit > 0 where the lung-windowed image exceeds 0.5 (HU > -600), with the settings a checkpoint carries."
    import torch
    class ThresholdModel(torch.nn.Module):
        in_channels = 1
        def __init__(self):
            super().__init__(); self.conv = torch.nn.Conv2d(1, 1, 1)
            with torch.no_grad(): self.conv.weight.fill_(40.); self.conv.bias.fill_(-20.)
            self.hparams = dict(preprocess=dict(window='lung', image_size=[24, 24], slab='all'), context_slices=0)
        def forward(self, x): return self.conv(x)
    return ThresholdModel()
