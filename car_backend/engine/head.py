"""A CRIS-style mask head on the frozen proposal CLIP: text-conditioned mask logits at patch resolution.

CRIS (CVPR 2022) turns CLIP into a dense segmenter with a vision-language decoder (pixels attend to the text)
and a text-to-pixel contrastive loss. Here CLIP stays frozen and only a small head is trained, per project,
from annotators' corrections:

- pixel features: the dense patch tokens `ProposalGenerator.prepare` already computes (the last block's
  input `ln_1` rows and the `ln_post` output, concatenated: (N, 2D) for an (h, w) grid, N = h * w);
- text features: the proposal CLIP's unit text embedding of each query (E);
- `depth` layers of [pixels attend to the texts (cross-attention, plus a learned "nothing" token so a pixel
  can attend to no label), a depth-wise 3x3 convolution over the grid (local context), an MLP];
- per-label logits = <pixel_out(P_n), kernel(t_q)> / sqrt(width) + bias(t_q): (Q, h, w).

`MaskHead.masks` gives soft masks (Q, H, W) in [0, 1] at image size (sigmoid, then the same bilinear
upsampling as CaR's proposals), which the segmenter blends with or puts in place of the Grad-CAM proposals;
CaR's classifier still decides which labels are present, and the CRF refines the result.

`train_head` fits a head on `HeadExample`s (features, text embeddings, per-label patch targets: labels present
and absent both teach) with a per-pixel binary cross-entropy on the text-pixel logits plus a soft Dice loss on
the present labels (`head_loss`), bounded by epochs and seconds, resumable from a `TrainingState`;
deterministic given its seed. `head_to_bytes` / `head_from_bytes`
are the stored form: zlib-compressed safetensors with the config and the CLIP identity in its metadata.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from car_backend.engine.errors import CarError
from car_backend.engine.imageops import cv2_linear_resize
from car_backend.engine.models import ClipModel
from car_backend.engine.proposals import ProposalImage

log = logging.getLogger(__name__)

DEFAULT_WIDTH = 192
DEFAULT_DEPTH = 2
DEFAULT_HEADS = 4
FORMAT = "car-mask-head/1"
MAX_BLOB_BYTES = 256 * 1024 * 1024  # a stored head that inflates beyond this is refused


class HeadError(CarError):
    """A stored head cannot be used: not a head blob, corrupt, or made for another CLIP."""


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape. pixel_dim / text_dim: the CLIP's (2 x its width, its embedding size); width: the
    decoder's channels; depth: decoder layers; heads: attention heads (must divide width)."""

    pixel_dim: int
    text_dim: int
    width: int = DEFAULT_WIDTH
    depth: int = DEFAULT_DEPTH
    heads: int = DEFAULT_HEADS

    def __post_init__(self):
        for name in ("pixel_dim", "text_dim", "width", "depth", "heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HeadConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"HeadConfig.width ({self.width}) must be a multiple of heads ({self.heads})")

    @classmethod
    def for_clip(cls, clip: ClipModel, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH,
                 heads: int = DEFAULT_HEADS) -> HeadConfig:
        return cls(pixel_dim=2 * clip.visual.transformer.width, text_dim=clip.visual.output_dim, width=width,
                   depth=depth, heads=heads)


def dense_features(clip: ClipModel, image: ProposalImage) -> torch.Tensor:
    """(N, 2D) float32 patch features of a prepared image: the last block's ln_1 rows of the patch tokens and
    the ln_post output of its patch tokens (both computed by `ProposalGenerator.prepare`)."""
    last = image.last_block
    post = clip.visual.ln_post
    return torch.cat([last.ln1[1:], last.post_hat * post.weight.float() + post.bias.float()], dim=-1)


class _DecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_cross = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.local = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, pixels: torch.Tensor, texts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """pixels (N, C), texts (Q + 1, C) -> (N, C)."""
        attended, _ = self.cross(self.norm_cross(pixels)[None], texts[None], texts[None], need_weights=False)
        pixels = pixels + attended[0]
        spatial = pixels.T.reshape(1, -1, *grid)
        pixels = pixels + self.local(spatial).reshape(pixels.shape[1], -1).T
        return pixels + self.mlp(self.norm_mlp(pixels))


class MaskHead(nn.Module):
    """The head (see the module docstring). `forward(features (N, pixel_dim), texts (Q, text_dim), grid)`
    gives logits (Q, h, w). `identity` names the CLIP it was trained on (its features mean nothing on
    another), `generation` the project's fit generation; neither affects the computation. `blend` is the
    weight of the head's masks against CaR's Grad-CAM proposals in the segmenter (1: the head's alone)."""

    def __init__(self, config: HeadConfig, identity: str = "", generation: int = 0, blend: float = 1.0):
        super().__init__()
        self.config = config
        self.identity = identity
        self.generation = generation
        self.blend = blend
        width = config.width
        self.pixel_in = nn.Sequential(nn.LayerNorm(config.pixel_dim), nn.Linear(config.pixel_dim, width))
        self.text_in = nn.Sequential(nn.Linear(config.text_dim, width), nn.GELU(), nn.Linear(width, width))
        self.nothing = nn.Parameter(torch.zeros(1, width))
        self.layers = nn.ModuleList(_DecoderLayer(width, config.heads) for _ in range(config.depth))
        self.pixel_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
        self.kernel = nn.Linear(width, width + 1)

    def forward(self, features: torch.Tensor, texts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        texts = self.text_in(texts)
        tokens = torch.cat([texts, self.nothing])
        pixels = self.pixel_in(features)
        for layer in self.layers:
            pixels = layer(pixels, tokens, grid)
        kernel = self.kernel(texts)
        logits = self.pixel_out(pixels) @ kernel[:, :-1].T / math.sqrt(self.config.width) + kernel[:, -1]
        return logits.T.reshape(len(texts), *grid)

    @torch.inference_mode()
    def masks(self, clip: ClipModel, image: ProposalImage, texts: torch.Tensor) -> torch.Tensor:
        """Soft masks (Q, H, W) in [0, 1] at the image's size for unit text embeddings (Q, E) of `clip`."""
        device = image.last_block.ln1.device
        self.to(device)
        logits = self(dense_features(clip, image), texts.float().to(device), image.grid)
        return cv2_linear_resize(torch.sigmoid(logits), image.size)

    @property
    def megabytes(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.parameters()) / 2 ** 20


def new_head(config: HeadConfig, seed: int, identity: str = "") -> MaskHead:
    """A freshly initialised head; the same seed gives the same weights on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskHead(config, identity)


# ------------------------------------------------------------------------------------------------ training
@dataclass
class HeadExample:
    """One image's training signal. features (N, pixel_dim) and texts (Q, text_dim) on any device; targets
    (Q, h, w) float in [0, 1]: the fraction of each patch the label covers (all zeros: the label is absent)."""

    features: torch.Tensor
    texts: torch.Tensor
    targets: torch.Tensor
    grid: tuple[int, int]


@dataclass
class TrainingState:
    """Where a training run stands: what `train_head` resumes from. `optimizer` is the AdamW state dict."""

    head: MaskHead
    optimizer: dict
    epochs: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each epoch done


def patch_targets(masks: Sequence[np.ndarray | None], grid: tuple[int, int]) -> torch.Tensor:
    """(Q, h, w) float32 patch coverage of bool masks (H, W) (None: the label is absent), by area averaging."""
    height, width = grid
    rows = []
    for mask in masks:
        if mask is None or not np.any(mask):
            rows.append(np.zeros(grid, dtype=np.float32))
            continue
        rows.append(cv2.resize(np.asarray(mask, dtype=np.float32), (width, height), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(rows))


def start_training(config: HeadConfig, seed: int, identity: str = "", learning_rate: float = 1e-3
                   ) -> TrainingState:
    head = new_head(config, seed, identity)
    return TrainingState(head=head, optimizer=_optimizer(head, learning_rate).state_dict())


def train_head(state: TrainingState, examples: Sequence[HeadExample], epochs: int, seed: int,
               seconds: float | None = None, device: torch.device | str = "cpu", learning_rate: float = 1e-3,
               on_epoch: Callable[[TrainingState], None] | None = None) -> TrainingState:
    """Train `state` in place until it has `epochs` epochs, or `seconds` have passed (checked after each epoch).

    Each epoch visits the examples in an order drawn from (seed, epoch), so that a resumed run takes the
    same path as an uninterrupted one. Loss: `head_loss` of the logits against the patch targets, present
    labels (target > 0 somewhere) and absent ones (all zero) alike. `on_epoch` is called
    after every epoch (to store a checkpoint). Raises ValueError when there is no example.
    """
    if not examples:
        raise ValueError("no training example")
    device = torch.device(device)
    head = state.head.to(device).train()
    optimizer = _optimizer(head, learning_rate)
    optimizer.load_state_dict(state.optimizer)
    started = time.monotonic()
    with torch.inference_mode(False), torch.enable_grad(), _deterministic_cudnn():
        while state.epochs < epochs:
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + state.epochs))
            total = 0.0
            for index in order.tolist():
                example = examples[index]
                logits = head(example.features.float().to(device), example.texts.float().to(device), example.grid)
                loss = head_loss(logits, example.targets.float().to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            state.epochs += 1
            state.losses.append(total / len(examples))
            state.optimizer = optimizer.state_dict()
            if on_epoch is not None:
                on_epoch(state)
            if seconds is not None and time.monotonic() - started >= seconds:
                break
    head.eval()
    return state


def head_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy over every label (absent ones teach "nowhere"), plus a soft Dice loss over
    the present labels (target > 0 somewhere): objects cover a small part of the image, and cross-entropy alone
    leaves the head too unsure of them for the CRF to keep them. logits, targets: (Q, h, w)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    present = targets.flatten(1).amax(1) > 0
    if not present.any():
        return bce
    probs = torch.sigmoid(logits[present]).flatten(1)
    truth = targets[present].flatten(1)
    dice = 1 - (2 * (probs * truth).sum(1) + 1) / (probs.sum(1) + truth.sum(1) + 1)
    return bce + dice.mean()


@contextmanager
def _deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic kernels while training (its autotuned ones may differ run to run on CUDA)."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _optimizer(head: MaskHead, learning_rate: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)


# ------------------------------------------------------------------------------------------------ storage
def head_to_bytes(head: MaskHead, extra: dict[str, str] | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """zlib(safetensors) of the head's weights (plus `tensors`, prefixed `extra.`), with the format, config,
    identity, generation and `extra` in its metadata."""
    from safetensors.torch import save

    state = {f"head.{k}": v.detach().cpu().float().contiguous() for k, v in head.state_dict().items()}
    state.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
    metadata = {"format": FORMAT, "config": json.dumps(asdict(head.config)), "identity": head.identity,
                "generation": str(head.generation), "blend": repr(float(head.blend)),
                "extra": json.dumps(extra or {})}
    return zlib.compress(save(state, metadata=metadata), 6)


def head_from_bytes(blob: bytes, identity: str | None = None
                    ) -> tuple[MaskHead, dict[str, str], dict[str, torch.Tensor]]:
    """(head in eval mode on the CPU, extra metadata, extra tensors) from `head_to_bytes`' output.

    `identity`, when given, must equal the stored one. Raises HeadError for anything that is not such a blob
    (corrupt, truncated, another format, weights of another shape) or was made for another CLIP.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(blob, MAX_BLOB_BYTES)
        if inflater.unconsumed_tail:
            raise HeadError(f"the stored head inflates beyond {MAX_BLOB_BYTES} bytes")
        header_size = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + header_size]).get("__metadata__") or {}
        if metadata.get("format") != FORMAT:
            raise HeadError(f"not a stored mask head (format {metadata.get('format')!r:.40})")
        config = HeadConfig(**json.loads(metadata["config"]))
        tensors = load(raw)
        head = MaskHead(config, metadata.get("identity", ""), int(metadata.get("generation", "0")),
                        float(metadata.get("blend", "1.0")))
        if not 0.0 <= head.blend <= 1.0:
            raise ValueError("blend out of [0, 1]")
        head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
        extra = json.loads(metadata.get("extra", "{}"))
    except HeadError:
        raise
    except (zlib.error, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise HeadError(f"the stored head is corrupt ({type(exc).__name__})") from None
    if identity is not None and head.identity != identity:
        raise HeadError(f"the stored head was trained on CLIP {head.identity!r}, not {identity!r}")
    extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return head.eval(), extra, extras


def state_to_bytes(state: TrainingState) -> bytes:
    """A training checkpoint: the head's blob with the AdamW state (its tensors and `step`s) and the epochs."""
    tensors = {}
    for index, entry in state.optimizer["state"].items():
        for name, value in entry.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).float()
    extra = {"epochs": str(state.epochs), "losses": json.dumps(state.losses),
             "param_groups": json.dumps(state.optimizer["param_groups"])}
    return head_to_bytes(state.head, extra, tensors)


def state_from_bytes(blob: bytes, identity: str | None = None) -> TrainingState:
    """The inverse of `state_to_bytes`; HeadError for a blob that is not a checkpoint (see head_from_bytes)."""
    head, extra, tensors = head_from_bytes(blob, identity)
    try:
        entries: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            entries.setdefault(int(index), {})[name] = value
        optimizer = {"state": entries, "param_groups": json.loads(extra["param_groups"])}
        return TrainingState(head, optimizer, int(extra["epochs"]), [float(v) for v in json.loads(extra["losses"])])
    except (KeyError, ValueError, TypeError) as exc:
        raise HeadError(f"the stored training checkpoint is corrupt ({type(exc).__name__})") from None
