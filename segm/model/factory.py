"""Build models from ``net_kwargs`` (Segmenter for ViT backbones, SegFormer for MiT ones), load checkpoints
(never downloading), and initialise encoders from ImageNet weights (timm hub names or local files)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import yaml

from segm.config import backbone_config, decoder_config, known_names
from segm.model.decoder import DecoderLinear, MaskTransformer
from segm.model.policy_net import PolicyNet
from segm.model.segformer import create_segformer
from segm.model.segmenter import Segmenter
from segm.model.vit import VisionTransformer, resize_pos_embed
from segm.model.weights import check_state_dict, read_checkpoint, strip_prefix, to_float32, unwrap
from tokred.errors import UsageError

DECODERS_BY_FAMILY = {"vit": ("linear", "mask_transformer"), "mit": ("segformer",)}
DECODERS = tuple(d for decoders in DECODERS_BY_FAMILY.values() for d in decoders)

# timm 1.x hub weights matching the ImageNet initialisation of the reference (AugReg in21k -> in1k at 384,
# the original in21k -> in1k weights for L/32, and the DeiT distilled weights).
TIMM_PRETRAINED = {
    "vit_tiny_patch16_384": "vit_tiny_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch16_384": "vit_small_patch16_384.augreg_in21k_ft_in1k",
    "vit_base_patch16_384": "vit_base_patch16_384.augreg_in21k_ft_in1k",
    "vit_large_patch16_384": "vit_large_patch16_384.augreg_in21k_ft_in1k",
    "vit_small_patch32_384": "vit_small_patch32_384.augreg_in21k_ft_in1k",
    "vit_base_patch32_384": "vit_base_patch32_384.augreg_in21k_ft_in1k",
    "vit_large_patch32_384": "vit_large_patch32_384.orig_in21k_ft_in1k",
    "deit_tiny_distilled_patch16_224": "deit_tiny_distilled_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384.fb_in1k",
}

ENCODER_KEYS = ("image_size", "patch_size", "n_layers", "d_model", "n_heads", "dropout", "drop_path_rate", "distilled")
POLICY_KEYS = ("policy_method", "policy_schedule", "policynet_ckpt")  # CTS's net_kwargs
POLICY_METHODS = ("policy_net", "no_sharing")
MODEL_PARTS = {"policy_net": {"policy_method": "policy_net"}}  # net_kwargs that give a model each optional part
NET_KEYS = set(ENCODER_KEYS) | set(POLICY_KEYS) | {"backbone", "normalization", "n_cls", "decoder", "d_ff"}


def net_kwargs_for(
    backbone: str,
    decoder: str,
    n_cls: int,
    crop_size: int,
    dropout: float = 0.0,
    drop_path_rate: float = 0.1,
    normalization: str | None = None,
) -> dict[str, Any]:
    """The ``net_kwargs`` of a run, as written to ``variant.yml``: backbone at the crop size plus decoder."""
    net = backbone_config(backbone)
    if decoder not in DECODERS:
        raise UsageError(f"unknown decoder '{decoder}'; known decoders: {', '.join(DECODERS)}")
    family = net.get("family", "vit")
    if decoder not in DECODERS_BY_FAMILY[family]:
        raise UsageError(f"decoder '{decoder}' does not decode the {family} backbone {backbone}; use "
                         f"{' or '.join(DECODERS_BY_FAMILY[family])}")
    dec = decoder_config(decoder)
    dec.update(name=decoder, n_cls=n_cls)
    if "decoder_channels" in net:
        dec["channels"] = net.pop("decoder_channels")
    net.update(
        backbone=backbone,
        image_size=[crop_size, crop_size],
        n_cls=n_cls,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
        decoder=dec,
    )
    if normalization is not None:
        net["normalization"] = normalization
    return net


def create_vit(model_cfg: Mapping[str, Any]) -> VisionTransformer:
    """The encoder described by ``model_cfg`` (a variant's ``net_kwargs`` without its decoder)."""
    backbone = model_cfg.get("backbone")
    if backbone is not None and backbone not in known_names("model"):
        raise UsageError(f"unknown backbone '{backbone}'; known backbones: {', '.join(known_names('model'))}")
    unknown = sorted(set(model_cfg) - NET_KEYS)
    if unknown:
        raise UsageError(f"unknown model settings: {', '.join(unknown)}")
    kwargs = {k: model_cfg[k] for k in ENCODER_KEYS if k in model_cfg}
    image_size = kwargs["image_size"]
    kwargs["image_size"] = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return VisionTransformer(n_cls=1000, d_ff=4 * model_cfg["d_model"], **kwargs)


def create_decoder(encoder: VisionTransformer, decoder_cfg: Mapping[str, Any]) -> nn.Module:
    """``DecoderLinear`` or ``MaskTransformer`` on top of ``encoder`` (heads = d_model // 64, d_ff = 4 d_model)."""
    cfg = dict(decoder_cfg)
    name = cfg.pop("name", None)
    if name not in DECODERS_BY_FAMILY["vit"]:
        raise UsageError(f"unknown decoder '{name}' for a ViT encoder; known decoders: "
                         f"{', '.join(DECODERS_BY_FAMILY['vit'])}")
    n_cls = cfg.pop("n_cls")
    if name == "linear":
        return DecoderLinear(n_cls=n_cls, patch_size=encoder.patch_size, d_encoder=encoder.d_model)
    dim = encoder.d_model
    return MaskTransformer(
        n_cls=n_cls,
        patch_size=encoder.patch_size,
        d_encoder=dim,
        n_layers=cfg["n_layers"],
        n_heads=dim // 64,
        d_model=dim,
        d_ff=4 * dim,
        drop_path_rate=cfg["drop_path_rate"],
        dropout=cfg["dropout"],
    )


def create_policy_net(net_kwargs: Mapping[str, Any]) -> tuple[PolicyNet | None, tuple[int, int] | None]:
    """CTS's policy network (random weights) when ``net_kwargs`` asks for one, and its token schedule.

    ``policynet_ckpt`` is the training-time path of the policy weights; it is not read here (a
    checkpoint holds the policy weights, and the path usually does not exist where a model is loaded).
    """
    method = net_kwargs.get("policy_method")
    if method is not None and method not in POLICY_METHODS:
        raise UsageError(f"unknown policy_method '{method}'; known: {', '.join(POLICY_METHODS)}")
    schedule = net_kwargs.get("policy_schedule")
    schedule = tuple(int(v) for v in schedule) if schedule is not None else None
    return (PolicyNet() if method == "policy_net" else None), schedule


def create_segmenter(net_kwargs: Mapping[str, Any], pretrained: bool | str | Path = False) -> Segmenter:
    """A Segmenter from a variant's ``net_kwargs``; the argument is not modified.

    ``pretrained``: ``False`` (random initialisation), ``True`` (timm hub ImageNet weights of the backbone)
    or a path to a local weight file for the encoder. With ``policy_method: policy_net`` (CTS) the model
    holds a policy network too. A ``mit`` backbone gives a SegFormer.
    """
    cfg = copy.deepcopy(dict(net_kwargs))
    if cfg.get("family") == "mit":
        return create_segformer(cfg, pretrained)
    decoder_cfg = cfg.pop("decoder")
    decoder_cfg.setdefault("n_cls", cfg["n_cls"])
    policy_net, schedule = create_policy_net(cfg)
    encoder = create_vit({k: v for k, v in cfg.items() if k not in POLICY_KEYS})
    if pretrained:
        load_pretrained_encoder(encoder, cfg["backbone"], pretrained)
    decoder = create_decoder(encoder, decoder_cfg)
    return Segmenter(encoder, decoder, n_cls=cfg["n_cls"], policy_net=policy_net, policy_schedule=schedule)


def load_policy_weights(policy_net: PolicyNet, path: str | Path) -> None:
    """Load a trained policy network (``policynet.pth``, CTS's ``model.pth`` or ``{"model": ...}``) strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy network checkpoint not found: {path}")
    data = read_checkpoint(path)
    state = data["model"] if isinstance(data, dict) and "model" in data else data
    state = strip_prefix(strip_prefix(state, "module."), "policy_net.")
    check_state_dict(policy_net, state, f"policy network checkpoint {path}")
    policy_net.load_state_dict(to_float32(state), strict=True)


class _VariantLoader(yaml.SafeLoader):
    """Safe YAML plus ``!!python/tuple`` (written by the reference's ``yaml.dump``); nothing else Python-specific."""


_VariantLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple", lambda loader, node: tuple(loader.construct_sequence(node))
)


def load_variant(path: str | Path) -> dict[str, Any]:
    """Read a ``variant.yml``; tuples are accepted, arbitrary Python objects are refused."""
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_VariantLoader)
    except yaml.constructor.ConstructorError as err:
        raise UsageError(f"{path}: refused to build a Python object from tag {err.problem.split()[-1]}") from None


def find_variant(checkpoint_path: Path) -> Path:
    """``variant.yml`` (or ``variant.yaml``) beside a checkpoint."""
    for name in ("variant.yml", "variant.yaml"):
        candidate = checkpoint_path.parent / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no variant.yml or variant.yaml beside {checkpoint_path}")


def load_model(model_path: str | Path, weights_only: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint and its variant: ``model, variant = load_model("run/checkpoint.pth")``.

    Reads ``variant.yml`` beside the checkpoint, builds the model (Segmenter or SegFormer) without
    downloading anything, loads ``checkpoint["model"]`` (or mmseg's ``checkpoint["state_dict"]``) strictly
    (fp16 weights are cast to fp32) and returns the model in eval mode. A directory is taken to mean its
    ``checkpoint.pth``.
    """
    path = Path(model_path)
    if path.is_dir():
        path = path / "checkpoint.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    variant = load_variant(find_variant(path))
    model = create_segmenter(variant["net_kwargs"], pretrained=False)
    data = read_checkpoint(path, weights_only=weights_only)
    state_dict = unwrap(data, ("model", "state_dict"))
    if not isinstance(state_dict, Mapping):
        raise UsageError(f"{path} holds no state dict (expected {{'model': state_dict, ...}} or mmseg's "
                         "{'state_dict': ..., 'meta': ...})")
    state_dict = strip_prefix(state_dict, "module.")
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(to_float32(state_dict), strict=True)
    model.eval()
    return model, variant


def _timm_hub_weights(backbone: str) -> dict[str, torch.Tensor]:
    import timm

    name = TIMM_PRETRAINED.get(backbone)
    if name is None:
        raise UsageError(
            f"no timm hub weights match '{backbone}' at this resolution; pass a local weight file "
            "(--pretrained PATH) or train without pretraining (--no-pretrained)"
        )
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as err:
        raise ConnectionError(
            f"could not fetch the ImageNet weights '{name}' ({type(err).__name__}); download them once with "
            f"network access (timm.create_model('{name}', pretrained=True)), pass a local weight file "
            "(--pretrained PATH), or train without pretraining (--no-pretrained)"
        ) from None
    return model.state_dict()


def _npz_weights(path: Path, encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """Convert a Google ``.npz`` ViT checkpoint with timm's own reader, at the file's native grid."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    with np.load(path) as npz:
        pos = npz["Transformer/posembed_input/pos_embedding"]
        n_classes = npz["head/bias"].shape[-1] if "head/bias" in npz else 0
    side = int(round((pos.shape[1] - 1) ** 0.5))
    timm_vit = TimmViT(
        img_size=side * encoder.patch_size,
        patch_size=encoder.patch_size,
        embed_dim=encoder.d_model,
        depth=encoder.n_layers,
        num_heads=encoder.n_heads,
        num_classes=n_classes,
    )
    timm_vit.load_pretrained(str(path))
    return timm_vit.state_dict()


def _file_weights(path: Path, encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weight file not found: {path}")
    if path.suffix == ".npz":
        return _npz_weights(path, encoder)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return strip_prefix(unwrap(read_checkpoint(path), ("model", "state_dict")), "module.")


def load_pretrained_encoder(encoder: VisionTransformer, backbone: str, source: bool | str | Path) -> None:
    """Initialise ``encoder`` from ImageNet weights: timm hub weights (``True``) or a local file.

    Keys follow timm's ViT names, which are the encoder's. The position embedding is resized bilinearly
    to the encoder's grid; classification heads are loaded only when their shapes match (they are unused).
    """
    label = f"pretrained weights '{source}'" if source is not True else f"timm weights of '{backbone}'"
    weights = _timm_hub_weights(backbone) if source is True else _file_weights(Path(source), encoder)
    own = encoder.state_dict()
    heads = {k for k in own if k.startswith(("head.", "head_dist."))}
    for key in heads:
        if key in weights and weights[key].shape != own[key].shape:
            del weights[key]
    for key in heads - set(weights):
        weights[key] = own[key]
    if "pos_embed" in weights and weights["pos_embed"].shape != own["pos_embed"].shape:
        n_extra = encoder.num_prefix_tokens
        if weights["pos_embed"].shape[1] - n_extra <= 0 or ("dist_token" in weights) != encoder.distilled:
            raise UsageError(f"{label}: position embedding {tuple(weights['pos_embed'].shape)} does not fit")
        weights["pos_embed"] = resize_pos_embed(weights["pos_embed"], None, encoder.patch_embed.grid_size, n_extra)
    check_state_dict(encoder, weights, label)
    encoder.load_state_dict(to_float32(weights), strict=True)


def variant_normalization(variant: Mapping[str, Any]) -> str:
    """The input normalisation a model was trained with (``vit`` or ``deit``)."""
    return variant.get("dataset_kwargs", {}).get("normalization") or variant["net_kwargs"]["normalization"]


def variant_crop_size(variant: Mapping[str, Any]) -> int:
    """The training crop size of a model (its position-embedding grid times the patch size)."""
    return int(variant.get("dataset_kwargs", {}).get("crop_size") or variant["net_kwargs"]["image_size"][0])
