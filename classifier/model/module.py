"""The LightningModule: a timm backbone, its loss and per-stage torchmetrics."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from timm.data import Mixup
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torchmetrics import CatMetric

from classifier.model.losses import build_loss, inverse_frequency_weights, loss_normaliser
from classifier.model.metrics import WeightedMean, classification_metrics, decision_metrics, ranking_metrics
from classifier.model.net import ClassifierNet
from classifier.model.ood import scored_logits
from classifier.model.thresholds import tune_thresholds
from classifier.model.tta import TTA, predict_logits

STAGES = ("train", "val", "test")


class ImageClassifier(LightningModule):
    """Image classification with any timm backbone."""

    def __init__(
        self,
        class_names: list[str],
        backbone: str = "resnet18",
        pretrained: bool | str = False,
        drop_rate: float = 0.0,
        image_size: int | tuple[int, int] | None = None,
        task: Literal["multiclass", "multilabel"] = "multiclass",
        loss: Literal["ce", "bce", "focal", "asl"] | None = None,
        label_smoothing: float = 0.0,
        focal_gamma: float = 2.0,
        class_weights: Literal["auto"] | list[float] | None = None,
        tta: TTA | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_off_epoch: int | None = None,
        warmup_epochs: int = 0,
        ema_decay: float | None = None,
        head_hidden_dims: list[int] | None = None,
        freeze_backbone: bool = False,
        unfreeze_at_epoch: int | None = None,
        backbone_lr_scale: float = 1.0,
        layer_decay: float | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        preprocessing: dict | None = None,
        temperature: float = 1.0,
        thresholds: list[float] | float | None = None,
        target_precision: float | None = None,
        rejection: dict | None = None,
        reject: bool = True,
    ) -> None:
        """
        Args:
            class_names: Class names in index order (linked from the datamodule).
            backbone: Any timm model name.
            pretrained: False, True for the hub's weights, a path to a local weights file, or a model repo (hf-hub:ID,
                local-dir:PATH, or the folder `classifier push` wrote). Read once, when a fit starts from scratch; a
                checkpoint never needs it again.
            drop_rate: Dropout before the classifier head.
            image_size: Input size, for backbones built for one size (linked from the datamodule).
            task: multiclass (one class per image, softmax) or multilabel (a set of labels per image, one sigmoid
                per class); linked from the datamodule, which knows it from its label options.
            loss: multiclass: ce (cross-entropy, the default) or focal; multilabel: bce (binary cross-entropy, the
                default), focal or asl (timm's asymmetric loss).
            label_smoothing: Label smoothing of the loss (multilabel: each target towards 1/2).
            focal_gamma: Focusing parameter of the focal loss.
            class_weights: Per-class loss weights: a list, "auto" (inverse train-split frequency; multilabel, each
                label's positive weight negatives/positives) or None.
            tta: Test-time augmentation for test and predict: flip, crops (four corners) or flip_crops.
            mixup_alpha: Beta(alpha, alpha) of mixup; 0 turns it off. Batches are mixed on the device.
            cutmix_alpha: Beta(alpha, alpha) of cutmix; 0 turns it off. With both on, each batch picks one.
            mixup_off_epoch: From this epoch on, no more mixup/cutmix (fine-tune on clean images at the end).
            warmup_epochs: Epochs of linear LR warmup before the scheduler takes over (ramped per step under the
                default cosine, per epoch under a configured scheduler).
            ema_decay: Keep an exponential moving average of the weights (e.g. 0.999), updated every step. It is
                what validation sees and what checkpoints hold, so test and predict use it too.
            head_hidden_dims: Replace the backbone's linear head by an MLP with these hidden sizes (each
                Linear, BatchNorm, ReLU, Dropout(drop_rate)).
            freeze_backbone: Train the head only: the backbone's weights and BatchNorm statistics stay fixed.
            unfreeze_at_epoch: Freeze the backbone until this epoch, then train it too (progressive unfreezing).
            backbone_lr_scale: The backbone's learning rate relative to the head's.
            layer_decay: Layer-wise LR decay (timm's, for ViTs and others): each layer further from the head
                trains at this factor of the next one's LR.
            channels_last: NHWC memory layout for the weights and the inputs, which tensor cores run fastest;
                None turns it on for CUDA devices.
            compile: Compile the backbone with `torch.compile` (a minute or more of compiling, then faster steps).
            optimizer: Optimizer; AdamW by default.
            scheduler: LR scheduler, stepped once an epoch; None anneals with a cosine, stepped every optimizer
                step, over the whole run (`trainer.max_epochs` or `trainer.max_steps`).
            preprocessing: The eval preprocessing (timm data config) the network is trained for (linked from the
                datamodule); None resolves the backbone's own.
            temperature: Divides the logits of test and predict: set by `classifier calibrate`, which writes it
                into a new checkpoint. fit and lr_find train at 1.
            thresholds: Multilabel: the decision threshold of every label (one number) or of each (a list), instead
                of those tuned on validation at every validation of a fit and saved with the checkpoint.
            target_precision: Multilabel: tune each label's threshold to the lowest that reaches this precision on
                validation, instead of the one that maximises its F1.
            rejection: {"score": "energy" or "msp", "threshold", "keep"}: below this `classifier.model.ood` score an
                image is unknown (multilabel: unless a label reaches its threshold). Set by `classifier calibrate`.
            reject: predict marks the images below the rejection threshold unknown; false gives every image a class.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        for name, value in (("class_weights", class_weights), ("thresholds", thresholds)):
            if isinstance(value, list) and len(value) != num_classes:
                raise ValueError(f"--model.{name} has {len(value)} values for {num_classes} classes")
        self.multilabel = task == "multilabel"
        if (thresholds is not None or target_precision is not None) and not self.multilabel:
            raise ValueError("--model.thresholds and --model.target_precision are for multi-label data")
        self.net = ClassifierNet(
            backbone,
            self.class_names,
            drop_rate,
            image_size,
            head_hidden_dims,
            preprocessing,
            temperature,
            task,
            rejection=rejection,
        )
        if (given := self._given_thresholds()) is not None:
            self.net.thresholds.copy_(given)
        self.criterion = build_loss(loss, num_classes, class_weights is not None, label_smoothing, focal_gamma, task)
        if isinstance(class_weights, list):
            self.criterion.weight.copy_(torch.tensor(class_weights))
        self.mixup = None
        if mixup_alpha or cutmix_alpha:  # both losses take the soft targets it makes
            # label smoothing stays the criterion's job, so it applies the same with and without mixing
            self.mixup = Mixup(mixup_alpha, cutmix_alpha, label_smoothing=0.0, num_classes=num_classes)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.memory_format = torch.contiguous_format
        self.pretrained_loaded = False
        self.compiled = False
        for stage in STAGES:
            scores = ranking_metrics if self.multilabel else classification_metrics
            setattr(self, f"{stage}_metrics", scores(num_classes, prefix=f"{stage}/"))
            setattr(self, f"{stage}_loss", WeightedMean())
            if self.multilabel:
                setattr(self, f"{stage}_decisions", decision_metrics(num_classes, prefix=f"{stage}/"))
        if self.multilabel:  # validation's scores and labels, to tune the thresholds on
            self.val_scores, self.val_truth = CatMetric(nan_strategy="disable"), CatMetric(nan_strategy="disable")

    def setup(self, stage: str) -> None:
        """Class weights come from the train split, known only once the datamodule is set up; the memory layout
        and compilation from the device, known only once the trainer is."""
        if stage == "fit" and self.net.temperature != 1.0:
            raise ValueError(
                f"--model.temperature is {self.net.temperature}: fit and lr_find train the unscaled logits, so they "
                "need 1 (a checkpoint written by `classifier calibrate` is for test and predict; resume from the one "
                "it was calibrated from)"
            )
        if stage == "fit" and self.net.rejection:
            raise ValueError(
                "--model.rejection is set: its threshold was fitted on other weights than fit trains; fit without it "
                "(resume from the checkpoint it was calibrated from), then calibrate the new checkpoint"
            )
        if stage == "fit" and self.hparams.class_weights == "auto":
            datamodule = self.trainer.datamodule
            images = len(datamodule.splits.subset("train")[0]) if self.multilabel else None
            self.criterion.weight.copy_(inverse_frequency_weights(datamodule.class_counts, self.class_names, images))
        channels_last = self.hparams.channels_last
        if channels_last is None:
            channels_last = self.trainer.strategy.root_device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        if self.hparams.compile and not self.compiled:
            self.net.backbone.compile()  # in place: parameter names, and so checkpoints, stay as they are
            self.compiled = True

    def on_fit_start(self) -> None:
        """Pretrained weights, for a fit from scratch only: a resumed fit, test and predict take the checkpoint's."""
        if self.trainer.ckpt_path is None:
            self.start_from_pretrained()

    def start_from_pretrained(self) -> None:
        """Load the `pretrained` weights, once: a fit from scratch and `lr_find`'s sweep start from them."""
        if self.hparams.pretrained and not self.pretrained_loaded:
            self.net.load_pretrained(self.hparams.pretrained)
            self.pretrained_loaded = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """--model.thresholds wins over the thresholds the checkpoint was tuned to, and --model.class_weights over the
        loss weights it trained with (test's loss is then weighted as asked; `null` drops them)."""
        state = checkpoint["state_dict"]
        if (given := self._given_thresholds()) is not None and "net.thresholds" in state:
            state["net.thresholds"] = given
        weights = self.hparams.class_weights
        if weights is None:
            state.pop("criterion.weight", None)
        elif isinstance(weights, list):
            state["criterion.weight"] = torch.tensor(weights, dtype=torch.float)
        elif "criterion.weight" not in state:
            raise ValueError(
                "--model.class_weights auto is counted from the train split when a fit starts, and this checkpoint "
                "trained without weights: pass a list of one weight per class instead"
            )

    def _given_thresholds(self) -> Tensor | None:
        """--model.thresholds, one per class; None when not given."""
        given = self.hparams.thresholds
        return None if given is None else torch.as_tensor(given, dtype=torch.float).expand(len(self.class_names))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The network's own arguments, so `Predictor` rebuilds it from the checkpoint without this module."""
        checkpoint["net"] = self.net.config()

    def configure_callbacks(self) -> list[Callback]:
        """Lightning's EMA: validates with the average and saves it as the checkpoint's weights."""
        return [EMAWeightAveraging(decay=self.hparams.ema_decay)] if self.hparams.ema_decay else []

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def head_parameters(self) -> list[nn.Parameter]:
        """The classifier's parameters: the MLP head's, or the backbone's own linear head's."""
        return self.net.classifier_parameters()

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Everything the backbone holds but its classifier head."""
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.net.backbone.parameters() if id(p) not in head]

    def backbone_frozen(self) -> bool:
        """Frozen while freeze_backbone holds, or until unfreeze_at_epoch."""
        until = self.hparams.unfreeze_at_epoch
        frozen = self.hparams.freeze_backbone or until is not None
        return frozen and (until is None or self.current_epoch < until)

    def on_train_epoch_start(self) -> None:
        """(Un)freeze for this epoch; frozen BatchNorm layers keep their statistics by staying in eval mode."""
        frozen = self.backbone_frozen()
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(not frozen)
        if frozen:
            head = set(self.net.backbone.get_classifier().modules())
            for module in self.net.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module not in head:
                    module.eval()

    def param_groups(self) -> list[dict[str, Any]]:
        """The head at the optimizer's LR; the backbone at backbone_lr_scale of it, per layer with layer_decay.

        Norm and bias parameters get no weight decay (timm's rule); the others keep the optimizer's configured
        one, so their groups carry no `weight_decay` key. Groups carry timm's `lr_scale`; `configure_optimizers`
        applies it.
        """
        head = {id(p) for p in self.head_parameters()}
        backbone = self.net.backbone
        exempt = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()  # e.g. pos_embed
        if self.hparams.layer_decay is None:  # weight_decay 1.0 marks the decayed groups; dropped below
            groups = param_groups_weight_decay(backbone, 1.0, no_weight_decay_list=exempt)
        else:
            groups = param_groups_layer_decay(backbone, 1.0, exempt, layer_decay=self.hparams.layer_decay)
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in head]
            group["lr_scale"] = group.get("lr_scale", 1.0) * self.hparams.backbone_lr_scale
        head_module = self.net.head if list(self.net.head.parameters()) else backbone.get_classifier()
        head_groups = param_groups_weight_decay(nn.ModuleList([head_module, self.criterion]), 1.0)
        for group in head_groups:
            group["lr_scale"] = 1.0
        for group in [*groups, *head_groups]:
            if group["weight_decay"]:
                del group["weight_decay"]  # the optimizer's own
        return [group for group in [*groups, *head_groups] if group["params"]]

    def predict_logits(self, images: Tensor) -> Tensor:
        """Logits, or with TTA the log of the views' mean probabilities (the same thing for softmax and loss)."""
        return predict_logits(self, images, self.hparams.tta, self.multilabel)

    def _step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        images, targets, _ = batch
        loss_targets = targets.float() if self.multilabel else targets
        if stage == "train" and self._mixing():
            images, loss_targets = self._mix(images, targets)  # soft targets for the loss; metrics keep `targets`
        logits = self.predict_logits(images) if stage == "test" else self(images)
        loss = self.criterion(logits, loss_targets)
        metrics, mean_loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        # probabilities: torchmetrics would skip its softmax (ECE's) for a batch of logits that all lie in [0, 1]
        probs = self.net.probabilities(logits.detach())
        metrics.update(probs, targets)
        if self.multilabel:
            self._update_decisions(probs, targets, stage)
        mean_loss.update(loss.detach(), loss_normaliser(self.criterion, loss_targets))
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=False)
        return loss, logits

    def _update_decisions(self, probs: Tensor, targets: Tensor, stage: str) -> None:
        """Multi-label: the decisions' metrics, at 0.5 in a fit (whose validations tune the thresholds), at the
        tuned (or given) thresholds in validate and test; validation's scores are kept to tune them on."""
        thresholds = 0.5 if self.trainer.state.fn == "fit" else self.net.thresholds
        decisions = getattr(self, f"{stage}_decisions")
        decisions.update((probs >= thresholds).long(), targets)
        self.log_dict(decisions, on_step=False, on_epoch=True, prog_bar=False)
        if stage == "val":
            self.val_scores.update(probs)
            self.val_truth.update(targets)

    def on_validation_epoch_end(self) -> None:
        """Multi-label, in a fit: tune each label's threshold on this validation, so each checkpoint carries the
        thresholds of its own weights (unless --model.thresholds fixes them)."""
        if not self.multilabel:
            return
        tuning = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if tuning and self.hparams.thresholds is None and self.val_scores.update_count:
            probs, truth = self.val_scores.compute().cpu().numpy(), self.val_truth.compute().cpu().numpy()
            tuned = tune_thresholds(probs, truth, self.class_names, self.hparams.target_precision)
            self.net.thresholds.copy_(torch.from_numpy(tuned))
        self.val_scores.reset()
        self.val_truth.reset()

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._step(batch, "train")
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _mixing(self) -> bool:
        """Mixup/cutmix this batch? Not after the switch-off epoch."""
        off = self.hparams.mixup_off_epoch
        return self.mixup is not None and (off is None or self.current_epoch < off)

    def _mix(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """timm's mixup/cutmix, which pairs image i with image n-1-i; an odd batch's last image stays as it is,
        with a one-hot (multi-label: its own 0/1) target."""
        if len(images) % 2 == 0:
            return self._mix_even(images, targets)
        mixed, soft = self._mix_even(images[:-1], targets[:-1])
        last = targets[-1:] if self.multilabel else nn.functional.one_hot(targets[-1:], len(self.class_names))
        return torch.cat([mixed, images[-1:]]), torch.cat([soft, last.to(soft.dtype)])

    def _mix_even(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Multi-label targets are mixed as the images are: timm's one-hot targets take class indices only."""
        if not self.multilabel:
            return self.mixup(images, targets)
        weight = self.mixup._mix_batch(images)  # mixes the pairs in place; cutmix's weight is the kept area
        targets = targets.float()
        return images, weight * targets + (1 - weight) * targets.flip(0)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")[1]

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")[1]

    @property
    def rejection(self) -> dict | None:
        """The rejection predict applies: the network's (fitted by calibrate), unless --model.reject false."""
        return self.net.rejection if self.hparams.get("reject", True) else None

    def scored_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """`predict_logits`, and each image's OOD score from the image itself (`classifier.model.ood.plain_scores`)."""
        return scored_logits(self, images, self.hparams.tta, self.net.rejection, self.multilabel)

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> tuple[Tensor, Tensor | None]:
        """Logits, and the OOD scores when predict rejects (None otherwise)."""
        if self.rejection is None:
            return self.predict_logits(batch[0]), None
        return self.scored_logits(batch[0])

    def on_train_start(self) -> None:
        """The sanity check must not leak into the first epoch's validation metrics."""
        self.val_metrics.reset()
        self.val_loss.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        """The user's scheduler, stepped per epoch after `warmup_epochs`; by default a cosine over every optimizer
        step of the run (max_epochs or max_steps, accumulation included), after warmup_epochs' worth of steps."""
        optimizer = self.optimizer(self.param_groups())
        for group in optimizer.param_groups:
            group["lr"] *= group["lr_scale"]
        warmup = self.hparams.warmup_epochs
        if self.scheduler is not None:
            return {"optimizer": optimizer, "lr_scheduler": with_warmup(optimizer, self.scheduler(optimizer), warmup)}
        total = self.trainer.estimated_stepping_batches
        if math.isinf(total):
            raise ValueError("The default cosine schedule needs --trainer.max_epochs or --trainer.max_steps")
        warmup_steps = warmup * self.optimizer_steps_per_epoch() if warmup else 0
        cosine = CosineAnnealingLR(optimizer, T_max=max(1, int(total) - warmup_steps))
        scheduler = with_warmup(optimizer, cosine, warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: its batches over accumulate_grad_batches, the last partial step included."""
        trainer = self.trainer
        if trainer.train_dataloader is None:  # estimated_stepping_batches loads it, but not under max_steps alone
            trainer.fit_loop.setup_data()
        return math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)


def with_warmup(optimizer: Optimizer, scheduler: LRScheduler, steps: int) -> LRScheduler:
    """Steps 0..steps-1 at 1/(steps+1) .. steps/(steps+1) of the LR, then `scheduler` from the full LR."""
    if not steps:
        return scheduler
    ramp = LinearLR(optimizer, start_factor=1 / (steps + 1), end_factor=1.0, total_iters=steps)
    return SequentialLR(optimizer, [ramp, scheduler], milestones=[steps])
