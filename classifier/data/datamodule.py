"""The LightningDataModule: image folders in, uint8 batches out, normalised on the device."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from classifier.data.shards import ShardDataset, StreamedLoader

from classifier.core.geometry import resize_mode
from classifier.data.datasets import DeviceCropDataset, FileDataset, ImageDataset, loader
from classifier.data.duplicates import warn_before_fit
from classifier.data.file_facts import verify_files
from classifier.data.file_lists import ood_files, predict_files, readable
from classifier.data.rendering import DeviceRendering
from classifier.data.samplers import EpochStart, training_sampler
from classifier.data.shard_meta import ShardMeta, read_meta, shard_splits, split_files
from classifier.data.split_source import make_splits, recorded_split
from classifier.data.splits import SPLITS, Splits, write_split_files
from classifier.data.transforms import train_transform
from classifier.data.workers import available_cores, default_num_workers
from classifier.model.checkpoints import MACHINE_SETTINGS, read_checkpoint
from classifier.model.net import PREPROCESSING_KEYS, eval_transform, resolve_preprocessing

log = logging.getLogger(__name__)


class ImageFolderDataModule(DeviceRendering, LightningDataModule):
    """Splits, transforms and loaders for a folder of class subfolders (or train/ val/ test/ of them)."""

    def __init__(
        self,
        data_dir: str = "data/digits",
        predict_dir: str | None = None,
        ood_dir: str | None = None,
        backbone: str = "resnet18",
        image_size: int | tuple[int, int] | None = None,
        resize_mode: Literal["crop", "squash", "letterbox"] = "crop",
        crop_pct: float | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        num_folds: int | None = None,
        fold: int = 0,
        splits: str | None = None,
        manifest: str | None = None,
        manifest_root: str | None = None,
        path_column: str = "path",
        label_column: str = "label",
        label_delimiter: str | None = None,
        label_columns: list[str] | None = None,
        classes: list[str] | None = None,
        skip_bad_images: bool = False,
        hflip: float = 0.5,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float | None = 0.4,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        sampler: Literal["random", "balanced"] = "random",
        decode: Literal["auto", "cpu", "gpu"] = "auto",
        cache: Literal["none", "ram"] = "none",
        shards: str | None = None,
        shard_cache: str | None = None,
        shard_storage_options: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            data_dir: Class subfolders, or train/ [val/] [test/] folders of class subfolders.
            predict_dir: What `predict` classifies: a folder (searched recursively), one image, or a .txt file
                listing image paths (relative ones are taken from the list's folder). No labels needed.
            ood_dir: `test` also scores this folder (searched recursively) of images of none of the classes against
                the test split: how well the model tells them apart, and which it marks unknown.
            backbone: timm model name whose data config (size, mean/std, crop) the transforms follow.
            image_size: Overrides the backbone's input size: one number for a square, or [height, width].
            resize_mode: How eval fits an image of another shape in: `crop` resizes the shorter side and cuts the
                centre out (timm's default); `squash` resizes to the size, changing the aspect; `letterbox` fits the
                whole image inside and pads with the normalisation mean (timm's `border`). Training's random crops
                keep the mode's geometry: at the model's aspect for crop, at each image's own for squash and
                letterbox (then squashed, or fitted and padded).
            crop_pct: Overrides the backbone's eval crop fraction (squash and letterbox: 1, the whole image).
            batch_size: Images per batch on each device.
            num_workers: Loader processes; None takes one per core (under DDP, per core of this process's share)
                but one, up to 16.
            val_fraction: Share of train/ held out for validation when there is no val/ folder.
            test_fraction: Share of train/ held out for testing when there is no test/ folder.
            seed: Seed of the hold-outs, the folds and the shuffling.
            num_folds: Stratified k-fold over all but the test split; None for a single split.
            fold: Which fold validates, in [0, num_folds).
            splits: A splits.csv (from any run, or written by hand: `path,label,split`, paths relative to data_dir)
                that fixes which image is in which split, instead of the fractions and seed. Given a checkpoint,
                `validate`, `test` and a resumed `fit` take the split it was trained on, unless this is set.
            manifest: A CSV, TSV, Parquet or JSON Lines file listing the images (one row each: path and label, and
                optionally split, fold and group) instead of class folders; data_dir then becomes its root.
            manifest_root: Where the manifest's relative paths start; its own folder by default.
            path_column: The manifest's column of image paths.
            label_column: The manifest's column of labels.
            label_delimiter: Multi-label: split the label column into a set of labels at this string ("" for none
                of the classes).
            label_columns: Multi-label: the manifest's 0/1 columns, one per class, in class order.
            classes: Class names in index order; restored from checkpoints so indices never shift.
            skip_bad_images: Skip unreadable files with a warning instead of stopping.
            hflip: Probability of a horizontal flip in training.
            crop_scale: Area range of the random-resized crop in training.
            crop_ratio: Aspect-ratio range of the random-resized crop in training.
            color_jitter: Strength of brightness/contrast/saturation jitter in training; None for none. Off under
                an auto_augment policy, as in timm.
            auto_augment: A timm policy (`rand-m9-mstd0.5`, `augmix-m5-w4-d2`, `original`) or `trivialaugment`.
            random_erasing: Probability of erasing a random rectangle of each training image, on the device.
            sampler: `random` shuffles; `balanced` draws every class equally often (with replacement).
            decode: Where JPEGs are decoded: `gpu` decodes batches with nvJPEG and crops, flips and jitters them
                there, the loader workers only read bytes (other formats are decoded on the CPU within the same
                batch); `cpu` runs timm's transforms in the workers; `auto` is `gpu` on CUDA devices.
            cache: `ram` decodes the train and val images once, keeps them presized as uint8 in memory (val at
                eval's resize, image_size / crop_pct; train with enough pixels for the smallest crop that
                crop_scale and crop_ratio allow, or its own size), and crops them on the device every epoch. Falls
                back to reading from disk, with a warning, when they would not fit.
            shards: Shards written by `classifier shard` (a folder, or an s3://, gs://, azure:// or file:// URL):
                fit, validate and test stream them with LitData instead of reading data_dir, and their split, classes
                and task are the run's. The checkpoint records their split table, as a folder run's.
            shard_cache: Where LitData keeps the chunks it downloads from a URL (node-local scratch on a cluster);
                LitData's default when None.
            shard_storage_options: Passed to LitData's client for a URL: an S3-compatible endpoint, or Azure's
                account_url and credential. Never saved in checkpoints (it may hold secrets): keep it in a config file.
        """
        super().__init__()
        # the checkpoint keeps the split table itself, so a test elsewhere does not need this file
        self.save_hyperparameters(ignore=["splits", "shard_storage_options"])  # secrets stay out of checkpoints
        self.shard_storage_options = shard_storage_options
        self.splits_file = splits
        self.checkpoint_path: Path | None = None  # see use_checkpoint
        self._checkpoint_split: bytes | None = None  # its compressed split table
        self._checkpoint_preprocessing: dict[str, Any] = {}  # its network's stored preprocessing
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start = EpochStart()  # see state_dict
        self.datasets: dict[str, FileDataset] = {}
        self.unlisted: list[Path] = []  # images of data_dir that a recorded split does not hold
        self.unreadable: dict[Path, str] = {}  # predict's files that cannot be decoded, with the reason
        self._normalisation_on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._shard_paths: dict[str, list[Path]] = {}  # each streamed split's files, in row order
        self._streamed: StreamedLoader | None = None  # the training loader over shards, whose position is saved
        self._stream_position: dict[str, Any] | None = None  # where a resumed run's streaming epoch goes on

    @cached_property
    def shard_meta(self) -> ShardMeta:
        """--data.shards' metadata: classes, task, split table."""
        return read_meta(self.hparams.shards, self.shard_storage_options)

    @cached_property
    def splits(self) -> Splits:
        """Every image with its split: from --data.shards, else --data.splits, else the checkpoint, else made from
        the folder."""
        hp = self.hparams
        if hp.shards:
            recorded = (self.checkpoint_path, self._checkpoint_split)
            splits = shard_splits(self.shard_meta, self.splits_file, (hp.num_folds, hp.fold), *recorded)
            hp.data_dir, hp.classes = str(splits.root), splits.classes
            return splits
        recorded = recorded_split(self.splits_file, self.checkpoint_path, self._checkpoint_split, hp.data_dir)
        splits = make_splits(hp, recorded, self.task == "multilabel", bool(self.splits_file))
        if recorded is not None and not hp.manifest:
            self.unlisted = splits.unlisted()  # a manifest, not the folder, says what is in
        if hp.manifest and (recorded is None or self.splits_file):
            hp.data_dir = str(splits.root)  # where the split table's paths start, in checkpoints too
        hp.classes = splits.classes  # so checkpoints carry the class order
        return splits

    @property
    def split_source(self) -> str | None:
        """Where the split was recorded (--data.splits or the checkpoint); None when it is made from the folder."""
        if self.splits_file:
            return f"--data.splits {self.splits_file}"
        return f"checkpoint {self.checkpoint_path}" if self.checkpoint_path else None

    @property
    def task(self) -> str:
        """multilabel (each image has a set of labels: --data.label_delimiter or --data.label_columns) or
        multiclass (one class each); linked to the model's `task`."""
        if self.hparams.shards:
            return self.shard_meta.task
        return "multilabel" if self.hparams.label_delimiter or self.hparams.label_columns else "multiclass"

    @property
    def class_names(self) -> list[str]:
        """Class names in index order; from the checkpoint when given, else from the train folders."""
        return list(self.hparams.classes or self.splits.classes)

    @property
    def class_counts(self) -> list[int]:
        """Train-split images per class, for class-weighted losses."""
        return self.splits.class_counts("train")

    @cached_property
    def data_config(self) -> dict[str, Any]:
        """The backbone's timm data config with this module's overrides applied. Given a checkpoint, its stored
        interpolation, crop mode, mean and std win, so a newer timm cannot change how a trained model sees images."""
        hp = self.hparams
        config = resolve_preprocessing(hp.backbone, hp.image_size, hp.crop_pct, hp.resize_mode)
        stored = self._checkpoint_preprocessing
        config.update({key: stored[key] for key in ("interpolation", "crop_mode", "mean", "std") if key in stored})
        return config

    @classmethod
    def from_checkpoint(cls, path: Path, data_dir: str | None = None, **machine: Any) -> ImageFolderDataModule:
        """The data of a checkpoint's run, outside a trainer: its saved settings less the machine's (`machine` gives
        those), its frozen split and its preprocessing; `data_dir` where the images are now, if they moved."""
        saved = read_checkpoint(path).get("datamodule_hyper_parameters") or {}
        settings = {k: v for k, v in saved.items() if not k.startswith("_") and f"data.{k}" not in MACHINE_SETTINGS}
        datamodule = cls(**settings | ({"data_dir": data_dir} if data_dir else {}), **machine)
        datamodule.use_checkpoint(path)
        return datamodule

    def use_checkpoint(self, path: Path) -> None:
        """Evaluate, predict or resume with `path`'s split and preprocessing rather than those of the folder and
        of the installed timm. Read here, once: setup runs before Lightning restores `state_dict()`."""
        checkpoint = read_checkpoint(path)
        self.checkpoint_path = path
        self._checkpoint_split = (checkpoint.get(type(self).__qualname__) or {}).get("splits")
        self._checkpoint_preprocessing = (checkpoint.get("net") or {}).get("preprocessing") or {}
        self.__dict__.pop("data_config", None)  # read before the checkpoint was known, by the CLI's links

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The eval preprocessing as plain data, which the model keeps so that its checkpoint is self-contained."""
        return {key: self.data_config[key] for key in PREPROCESSING_KEYS}

    def transform(self, training: bool) -> Callable:
        """timm's train or eval pipeline, ending in a uint8 tensor (normalisation happens on the device)."""
        if not training:
            return eval_transform(self.preprocessing)
        hp = self.hparams
        return train_transform(
            self.data_config, hp.hflip, hp.crop_scale, hp.crop_ratio, hp.color_jitter, hp.auto_augment
        )

    def setup(self, stage: str) -> None:
        """Build the datasets the stage needs, after checking that every one of their files decodes."""
        if self.device_rendered and not self.device_renders_mode:
            raise ValueError(
                f"--data.resize_mode {resize_mode(self.data_config['crop_mode'])} renders on the CPU: use it with "
                "--data.decode cpu or auto, and --data.cache none (the device paths render --data.resize_mode crop)"
            )
        if self.hparams.shards and (self.hparams.cache == "ram" or self.hparams.decode == "gpu"):
            raise ValueError("--data.shards streams and decodes in LitData's loader workers: use it with "
                             "--data.cache none and --data.decode cpu or auto")  # fmt: skip
        if stage == "fit" and self.hparams.shards and self.hparams.sampler == "balanced":
            raise ValueError("--data.sampler balanced draws images with replacement; shards stream each image once "
                             "an epoch: use --model.class_weights auto for rare classes")  # fmt: skip
        if stage == "fit" and self.device_rendered and self.hparams.auto_augment:  # eval never augments
            raise ValueError(
                f"--data.auto_augment {self.hparams.auto_augment} works on PIL images in the loader workers; "
                "use it with --data.decode cpu or auto, and --data.cache none"
            )
        if stage == "fit" and self.task == "multilabel" and self.hparams.sampler == "balanced":
            raise ValueError("--data.sampler balanced draws one class per image; multi-label data takes "
                             "--model.class_weights auto (positive weights) for rare labels instead")  # fmt: skip
        if stage == "predict":
            paths, self.unreadable = predict_files(self.hparams.predict_dir)
            self.datasets["predict"] = self._dataset("predict", paths, [-1] * len(paths))
            return
        if stage == "test" and self.hparams.ood_dir:  # checked before any image is evaluated
            paths = ood_files(Path(self.hparams.ood_dir), self.hparams.skip_bad_images)
            self.datasets["ood"] = self._dataset("ood", paths, [-1] * len(paths))
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}[stage]
        if self.hparams.shards:
            for name in needed:
                self.datasets[name] = self._shard_dataset(name)
        else:
            for name, (paths, targets) in self.checked_splits(needed, stage).items():
                self.datasets[name] = self._dataset(name, paths, targets, self._cache(name, paths))
        self._write_splits_csv()

    def checked_splits(self, needed: tuple[str, ...], stage: str) -> dict[str, tuple[list[Path], list]]:
        """The files and targets of splits `needed`, every file checked to decode (a bad one refused, or skipped
        under --data.skip_bad_images) and unchanged since a recorded split. `fit` also checks the test split, and
        warns of duplicates and leaks, before it costs a run."""
        # fit checks the test split too, once into the verification cache: its bad files and copies are found now
        subsets = {name: self.splits.subset(name) for name in (SPLITS if stage == "fit" else needed)}
        every_path = [path for paths, _ in subsets.values() for path in paths]
        checked = verify_files(every_path, Path(self.hparams.data_dir), num_threads=2 * available_cores())
        hashes = {path: facts.file_hash for path, facts in checked.items()}
        for name in needed:
            self.splits.verify(name, self.split_source or "this run's split", hashes)
            if not subsets[name][0] and (stage != "fit" or name == "train"):  # fit may go without val
                raise ValueError(f"{self.hparams.data_dir} has no {name} split: add a {name}/ folder or a fraction")
        self.splits.record(hashes)  # fit's test split too: splits.csv needs every file's hash
        needed_paths = [path for name in needed for path in subsets[name][0]]
        bad = {path: checked[path].reason for path in needed_paths if checked[path].reason is not None}
        # every split's bad files in one error, not one per split
        keep = set(readable(needed_paths, bad, self.hparams.skip_bad_images))
        if stage == "fit" and (self.trainer is None or self.trainer.is_global_zero):
            warn_before_fit(self.splits, checked, set(needed_paths))
        kept = {}
        for name in needed:
            pairs = [(path, target) for path, target in zip(*subsets[name], strict=True) if path in keep]
            kept[name] = ([path for path, _ in pairs], [target for _, target in pairs])
        return kept

    def _shard_dataset(self, name: str) -> ShardDataset | FileDataset:
        """Split `name` streamed from --data.shards; an empty val split (fit may go without one) as no images. The
        shuffle seed is drawn from this module's generator, fresh at setup, so a resumed run draws it again."""
        meta = self.shard_meta
        self._shard_paths[name] = split_files(self.splits, meta, name)[0]
        if not meta.counts.get(name):
            if name == "val" and self.trainer is not None and self.trainer.state.fn == "fit":
                return self._dataset(name, [], [])
            raise ValueError(f"--data.shards {meta.location} holds no {name} split")
        training = name == "train"
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator)) if training else 0
        size = self.decode_size(training) if training else None
        location, cache = meta.split_location(name), self.hparams.shard_cache
        from classifier.data.shards import ShardDataset  # optional: LitData, the [shards] extra

        trainer, options = self.trainer, self.shard_storage_options
        ranks = (trainer.world_size, trainer.global_rank, trainer.num_nodes) if trainer is not None else None
        return ShardDataset(location, self.transform(training), size, training, seed, cache, ranks, options)

    def _dataset(
        self, name: str, paths: list[Path], targets: list[int], cache: dict[Path, Tensor] | None = None
    ) -> FileDataset:
        """The file path (timm's transforms in the workers) or the device-rendered one, as configured.

        Eval is rendered on the device only from the RAM cache, where its centre crop is an exact copy of the
        presized pixels; with GPU decoding it takes the CPU eval transform, so the hardware never changes a score.
        """
        training = name == "train"
        size = self.decode_size(training)
        if cache is None and not (training and self.gpu_decode):
            return ImageDataset(paths, targets, self.transform(training), size if training else None)
        interpolation = self.data_config["interpolation"]
        return DeviceCropDataset(paths, targets, self.planner(training), interpolation, size, cache, self.gpu_decode)

    @cached_property
    def split_csv(self) -> str:
        """splits.csv's text, made once (it hashes unhashed files), for the run folder and every checkpoint."""
        return self.splits.to_csv()

    @cached_property
    def split_table(self) -> bytes:
        """splits.csv, compressed, as checkpoints keep it: made once, however many checkpoints are saved."""
        return zlib.compress(self.split_csv.encode())

    def _write_splits_csv(self) -> None:
        """splits.csv into the run folder; with a recorded split, also the images it leaves out, and what to do."""
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks; None under fast_dev_run
        if log_dir is None or not trainer.is_global_zero:
            return
        hp = self.hparams
        write_split_files(
            Path(log_dir), self.split_csv, self.unlisted, hp.data_dir, self.split_source, self.checkpoint_path
        )

    def _loader(self, name: str) -> DataLoader | StreamedLoader:
        dataset = self.datasets[name]
        trainer = self.trainer
        workers = self.hparams.num_workers
        if workers is None:
            workers = default_num_workers(trainer.num_devices if trainer is not None else 1)
        training = name == "train"
        if not isinstance(dataset, FileDataset):  # shards: LitData splits the work across ranks and workers
            streamed = dataset.loader(self.hparams.batch_size, workers)
            if training:
                self._streamed = streamed
                if self._stream_position is not None:
                    streamed.resume(self._stream_position)
                    self._stream_position = None
            return streamed
        sampler = None
        if training:  # order and augmentation seeds from this module's generator, which checkpoints save
            balanced, classes = self.hparams.sampler == "balanced", len(self.class_names)
            sampler = training_sampler(dataset.targets, classes, balanced, self.generator, self.epoch_start)
        elif trainer is not None and trainer.world_size > 1:
            # each image evaluated exactly once, so synced metrics equal single-process ones
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return loader(dataset, self.hparams.batch_size, workers, sampler, training)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def ood_dataloader(self) -> DataLoader:
        """--data.ood_dir's images, which test scores after its own split (`classifier.evaluation.ood_reports`)."""
        return self._loader("ood")

    def paths(self, stage: str) -> list[Path]:
        """Files of a stage's dataset, in row-index order (streamed from shards: where they were when written)."""
        return self._shard_paths[stage] if stage in self._shard_paths else self.datasets[stage].paths

    def state_dict(self) -> dict[str, Any]:
        """The generator's state, so a resumed run draws the same batches and augmentations (inside an epoch, its
        state when the epoch began, with the samples trained on since); the split table, so that `validate`, `test`
        and a resumed fit see the images this run was trained on, whatever the folder holds by then."""
        batches = self._batches_done()
        state = {"generator": self.generator.get_state(), "samples_done": 0, "splits": self.split_table}
        if batches and self._streamed is not None:  # streamed from shards: LitData's position, as the trainer's
            state["stream"] = self._streamed.position(batches, self.trainer.world_size)
        elif batches:
            done = batches * self.hparams.batch_size * self.trainer.world_size
            state |= {"generator": self.epoch_start.state, "samples_done": done}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.epoch_start.done = state_dict.get("samples_done", 0)
        position = state_dict.get("stream")
        if position is None or self.trainer is None or self.trainer.state.fn != "fit":
            return
        if position["world_size"] != self.trainer.world_size:
            raise ValueError(
                f"the checkpoint was saved inside an epoch streamed from shards by {position['world_size']} "
                f"processes, and this run has {self.trainer.world_size}: resume with {position['world_size']} "
                "(--trainer.devices x --trainer.num_nodes), or from a checkpoint saved at an epoch's end"
            )
        self._stream_position = position

    def _batches_done(self) -> int:
        """Training batches, on each rank, of the epoch a checkpoint is saved inside; 0 between epochs."""
        trainer = self.trainer
        streaming = self.epoch_start.state is not None or self._streamed is not None  # a loader that can resume
        if trainer is None or trainer.state.fn != "fit" or not streaming:
            return 0
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return batches if 0 < batches < trainer.num_training_batches else 0
