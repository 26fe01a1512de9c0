"Helpers shared by the test files."
import logging

def save_checkpoint(module, path):
    "Write a Lightning checkpoint of `module` (untrained is fine) to `path`, as `Trainer.save_checkpoint` does after training."
    import lightning as L
    logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator='cpu')
    trainer.strategy.connect(module); trainer.save_checkpoint(path)
    return path
