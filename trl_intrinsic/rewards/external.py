"""External image rewards as plain callables: CLIPScore, PickScore, LAION aesthetics, HPSv2, ImageReward, OCR.

Each scorer is a plain object (not an ``nn.Module``: TRL would treat a module as a text sequence
classifier) with ``requires_images = True``, called as

* a flow reward: ``scorer(prompts, images, **kwargs)`` with PIL images (``FlowGRPOTrainer``), or
* a TRL/Janus reward: ``scorer(prompts=..., completions=[PIL images], **kwargs)``,

and returns one ``float`` per image, or ``None`` for a missing image (TRL treats ``None`` as "this
reward does not apply"). Models are loaded on the first call, not at construction, from a hub id or
a local directory, and run under ``torch.no_grad()`` in batches of ``batch_size`` on ``device``:
by default the device of the ``latents`` keyword if the trainer passes one, else CUDA if
available, else CPU. The trainer may also set ``scorer.device``.

CLIP image preprocessing uses transformers' PIL backend (``backend="pil"``) whether or not
torchvision is installed, so scores do not change with the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "AestheticScore",
    "CLIPScore",
    "HPSv2",
    "ImageReward",
    "OCRScore",
    "clip_score",
    "ocr_score",
    "pick_score",
]


def _missing(scorer: str, package: str, extra: str, note: str = "") -> ImportError:
    return ImportError(
        f'{scorer} needs the `{package}` package{note}. Install it with: pip install "trl-intrinsic[{extra}]"'
    )


def _resolve_file(name_or_path: str, filename: str) -> str:
    """A local file, a file ``filename`` in a local directory, or ``filename`` of a hub repository."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {filename!r} in {name_or_path!r}.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=name_or_path, filename=filename)


class _ImageScorer:
    """Shared call protocol: argument handling, ``None`` images, batching, lazy loading, device."""

    requires_images = True
    _name = "image_score"

    def __init__(self, *, device: str | torch.device | None = None, batch_size: int = 32) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        self.batch_size = batch_size
        self.device = device
        self._loaded = False
        self.__name__ = self._name

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded (it is, on the first call with at least one image)."""
        return self._loaded

    def _target_device(self, kwargs: dict[str, Any]) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        latents = kwargs.get("latents")
        if isinstance(latents, torch.Tensor):
            return latents.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        *,
        completions: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if images is None:
            images = completions
        if images is None:
            raise ValueError(
                f"{type(self).__name__} scores images: pass `images` (flow trainers) or `completions` "
                "(PIL images, Janus trainer)."
            )
        if isinstance(prompts, str) or len(prompts) != len(images):
            raise ValueError(
                f"Got {len(prompts)} prompts for {len(images)} images; give one prompt per image."
            )
        rows = [
            i for i, image in enumerate(images) if image is not None and self._applies(i, prompts, kwargs)
        ]
        out: list[float | None] = [None] * len(images)
        if not rows:
            return out
        device = self._target_device(kwargs)
        if not self._loaded:
            self._load(device)
            self._loaded = True
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            scores = self._score(
                [prompts[i] for i in chunk], [self._to_pil(images[i]) for i in chunk], chunk, kwargs, device
            )
            for i, s in zip(chunk, scores, strict=True):
                out[i] = float(s)
        return out

    # -- hooks for subclasses -------------------------------------------------------------------

    def _applies(self, row: int, prompts: Sequence[str], kwargs: dict[str, Any]) -> bool:
        return True

    def _load(self, device: torch.device) -> None:
        raise NotImplementedError

    def _score(
        self,
        prompts: list[str],
        images: list[Any],
        rows: list[int],
        kwargs: dict[str, Any],
        device: torch.device,
    ) -> list[float]:
        raise NotImplementedError

    @staticmethod
    def _to_pil(image: Any) -> Any:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"Expected PIL images, got {type(image).__name__}.")
        return image.convert("RGB") if image.mode != "RGB" else image


class _CLIPScorer(_ImageScorer):
    """A transformers ``CLIPModel`` with its tokenizer and (PIL-backend) image processor."""

    def __init__(
        self,
        model_name_or_path: str,
        processor_name_or_path: str | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path or model_name_or_path
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = self.tokenizer = self.image_processor = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.model_name_or_path!r}, processor={self.processor_name_or_path!r})"
        )

    def _load(self, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(self.model_name_or_path, dtype=self.dtype or torch.float32)
        self.model.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.processor_name_or_path)
        self.image_processor = AutoImageProcessor.from_pretrained(self.processor_name_or_path, backend="pil")

    def _model_on(self, device: torch.device) -> Any:
        if self.model.device != device:
            self.model.to(device)
        return self.model

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers ≥ 5 returns a model output whose pooler_output is the projected embedding.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_embeds(self, images: list[Any], device: torch.device) -> torch.Tensor:
        """``(N, projection_dim)`` L2-normalised fp32 image embeddings."""
        model = self._model_on(device)
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        emb = self._features(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """``(N, projection_dim)`` L2-normalised fp32 text embeddings (prompts truncated to the model's length)."""
        model = self._model_on(device)
        max_length = min(self.tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        emb = self._features(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
        return torch.nn.functional.normalize(emb.float(), dim=-1)


class CLIPScore(_CLIPScorer):
    """CLIPScore (Hessel et al., 2021, as in torchmetrics): ``max(100 · cos(image, prompt), 0)``, in [0, 100].

    Args:
        model_name_or_path: a transformers ``CLIPModel`` (hub id or local directory).
        processor_name_or_path: where the tokenizer and image processor are (default: the model's).
        device: where the model runs (default: the device of the ``latents`` keyword, else CUDA/CPU).
        batch_size: images per forward.
        dtype: model dtype (default fp32).
    """

    _name = "clip_score"

    def __init__(self, model_name_or_path: str = "openai/clip-vit-large-patch14", **kwargs: Any) -> None:
        super().__init__(model_name_or_path, **kwargs)

    def _score(self, prompts, images, rows, kwargs, device):
        cos = (self.image_embeds(images, device) * self.text_embeds(prompts, device)).sum(-1)
        return (100 * cos).clamp_min(0).tolist()


class PickScore(_CLIPScorer):
    """PickScore (Kirstain et al., 2023): ``exp(logit_scale) · cos(image, prompt)`` of a fine-tuned CLIP-H.

    Raw scale (about 18–24 for typical images); Flow-GRPO divides by 26 — use ``reward_weights`` to
    rescale. Arguments as :class:`CLIPScore`; the processor comes from the LAION CLIP-H repository.
    """

    _name = "pick_score"

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path, processor_name_or_path, **kwargs)

    def _score(self, prompts, images, rows, kwargs, device):
        cos = (self.image_embeds(images, device) * self.text_embeds(prompts, device)).sum(-1)
        return (self.model.logit_scale.float().exp() * cos).tolist()


class AestheticScore(_CLIPScorer):
    """LAION aesthetic predictor: an affine head on the L2-normalised CLIP ViT-L/14 image embedding.

    The score ignores the prompt (about 1–10; ~5 for ordinary images). The head is a stack of affine
    layers without activations, exactly as LAION's improved aesthetic predictor (its dropout layers
    are inactive at inference), read from a safetensors file with keys ``layers.{i}.weight`` /
    ``layers.{i}.bias`` (the MLP) or ``weight`` / ``bias`` (the linear v1 head). LAION publishes the
    head as a pickled ``.pth``; convert it once (tensors only, no code runs)::

        sd = torch.load("sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
        safetensors.torch.save_file(sd, "aesthetic_head.safetensors")

    Args:
        head_name_or_path: the head's safetensors file, a directory holding ``head_filename``, or a
            hub repository holding it.
        clip_model_name_or_path: the CLIP model whose image embedding the head was trained on.
        head_filename: file name inside a directory or repository.
    """

    _name = "aesthetic_score"

    def __init__(
        self,
        head_name_or_path: str,
        clip_model_name_or_path: str = "openai/clip-vit-large-patch14",
        *,
        head_filename: str = "model.safetensors",
        **kwargs: Any,
    ) -> None:
        super().__init__(clip_model_name_or_path, **kwargs)
        self.head_name_or_path = head_name_or_path
        self.head_filename = head_filename
        self.head: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _load(self, device: torch.device) -> None:
        from safetensors.torch import load_file

        state = load_file(_resolve_file(self.head_name_or_path, self.head_filename))
        if "weight" in state:
            prefixes = [""]
        else:
            found = {m.group(1) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.weight", k))}
            prefixes = [f"layers.{i}." for i in sorted(map(int, found))]
        if not prefixes:
            raise ValueError(
                f"Aesthetic head {self.head_name_or_path!r} has no `weight` or `layers.<i>.weight` tensors "
                f"(keys: {sorted(state)[:8]})."
            )
        self.head = [(state[p + "weight"].float(), state[p + "bias"].float()) for p in prefixes]
        for (w1, _), (w2, _) in zip(self.head, self.head[1:]):
            if w1.shape[0] != w2.shape[1]:
                raise ValueError(
                    f"Aesthetic head layers do not chain: {tuple(w1.shape)} then {tuple(w2.shape)}."
                )
        if self.head[-1][0].shape[0] != 1:
            raise ValueError(f"Aesthetic head must output one score, got {self.head[-1][0].shape[0]}.")
        super()._load(device)
        embed_dim = self.model.config.projection_dim
        if self.head[0][0].shape[1] != embed_dim:
            raise ValueError(
                f"Aesthetic head expects {self.head[0][0].shape[1]}-d embeddings but "
                f"{self.model_name_or_path!r} gives {embed_dim}-d: use the CLIP model it was trained on."
            )

    def _score(self, prompts, images, rows, kwargs, device):
        x = self.image_embeds(images, device)
        for w, b in self.head:
            x = torch.nn.functional.linear(x, w.to(device), b.to(device))
        return x[:, 0].tolist()


class HPSv2(_ImageScorer):
    """Human Preference Score v2 / v2.1 (Wu et al., 2023), via the ``hpsv2`` package (needs torchvision).

    The checkpoint must be a safetensors file of the model's state dict (the official ``.pt`` files
    are pickles; convert once with ``torch.load(path, weights_only=True)["state_dict"]`` and
    ``safetensors.torch.save_file``).

    Args:
        checkpoint: the safetensors file, a directory holding ``checkpoint_filename``, or a hub repository.
        checkpoint_filename: file name inside a directory or repository.
    """

    _name = "hpsv2"

    def __init__(
        self,
        checkpoint: str,
        *,
        checkpoint_filename: str = "model.safetensors",
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.checkpoint, self.checkpoint_filename = checkpoint, checkpoint_filename

    def _load(self, device: torch.device) -> None:
        try:
            from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
        except ImportError as err:
            raise _missing("HPSv2", "hpsv2", "hpsv2", " (and torchvision matching your torch)") from err
        from safetensors.torch import load_file

        model, _, self.preprocess = create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device=device, output_dict=True
        )
        model.load_state_dict(load_file(_resolve_file(self.checkpoint, self.checkpoint_filename)))
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def _score(self, prompts, images, rows, kwargs, device):
        self.model.to(device)
        pixels = torch.stack([self.preprocess(im) for im in images]).to(device)
        out = self.model(pixels, self.tokenizer(prompts).to(device))
        return (out["image_features"] * out["text_features"]).sum(-1).float().tolist()


class ImageReward(_ImageScorer):
    """ImageReward (Xu et al., 2023), via the ``image-reward`` package (needs torchvision).

    Args:
        checkpoint: safetensors state dict of ``ImageReward.ImageReward`` (file, directory or hub
            repository; convert the official ``ImageReward.pt`` once with
            ``torch.load(path, weights_only=True)`` and ``safetensors.torch.save_file``).
        med_config: the BLIP ``med_config.json`` (file, directory or hub repository).
    """

    _name = "image_reward"

    def __init__(
        self,
        checkpoint: str,
        med_config: str = "THUDM/ImageReward",
        *,
        checkpoint_filename: str = "model.safetensors",
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.checkpoint, self.med_config, self.checkpoint_filename = (
            checkpoint,
            med_config,
            checkpoint_filename,
        )

    def _load(self, device: torch.device) -> None:
        try:
            from ImageReward.ImageReward import ImageReward as _Model
        except ImportError as err:
            raise _missing(
                "ImageReward", "image-reward", "imagereward", " (and torchvision matching your torch)"
            ) from err
        from safetensors.torch import load_file

        model = _Model(med_config=_resolve_file(self.med_config, "med_config.json"), device=device)
        model.load_state_dict(
            load_file(_resolve_file(self.checkpoint, self.checkpoint_filename)), strict=False
        )
        self.model = model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def _score(self, prompts, images, rows, kwargs, device):
        self.model.to(device)
        self.model.device = device
        return [self.model.score(p, im) for p, im in zip(prompts, images)]


# ---------------------------------------------------------------------------------------------- OCR

_QUOTED = re.compile(r"[\"“”]([^\"“”]+)[\"“”]")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


class OCRScore(_ImageScorer):
    """Text-rendering accuracy: ``1 − edit_distance(read, target) / max(len(read), len(target))``, in [0, 1].

    The target is the text in double quotes in the prompt (``a sign that says "OPEN"``; several
    quoted spans are joined by a space), or the dataset column ``target_column``. Rows whose prompt
    has no quoted text get ``None``. Text is read with RapidOCR (PP-OCRv4 ONNX models shipped inside
    the ``rapidocr-onnxruntime`` wheel: no download, CPU) unless ``ocr_fn`` is given.

    Args:
        ignore_case: compare lower-cased text.
        ignore_spaces: drop whitespace before comparing (the detector splits lines unpredictably).
        variant: ``"max_length"`` (default, the formula above) or ``"flow_grpo"`` (Flow-GRPO's OCR
            reward: 1 if the target occurs in the read text, else ``1 − min(d, len(target)) / len(target)``).
        target_column: take targets from this dataset column (a keyword of the call) instead of the prompt.
        ocr_fn: ``PIL.Image -> str``, another OCR engine.
        engine_kwargs: options of ``rapidocr_onnxruntime.RapidOCR`` (e.g. ``{"det_limit_side_len": 512,
            "intra_op_num_threads": 4}``; by default the detector upscales the short side to 736 px).
    """

    _name = "ocr_score"

    def __init__(
        self,
        *,
        ignore_case: bool = True,
        ignore_spaces: bool = True,
        variant: str = "max_length",
        target_column: str | None = None,
        ocr_fn: Callable[[Any], str] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__(device="cpu", batch_size=batch_size)
        if variant not in ("max_length", "flow_grpo"):
            raise ValueError(f"`variant` must be 'max_length' or 'flow_grpo', got {variant!r}.")
        self.ignore_case, self.ignore_spaces = ignore_case, ignore_spaces
        self.variant, self.target_column, self.ocr_fn = variant, target_column, ocr_fn
        self.engine_kwargs = dict(engine_kwargs or {})

    @staticmethod
    def target_text(prompt: str) -> str | None:
        """The quoted text of ``prompt`` (spans joined by a space), or ``None``."""
        spans = [s.strip() for s in _QUOTED.findall(prompt)]
        spans = [s for s in spans if s]
        return " ".join(spans) if spans else None

    def _target(self, prompt: str, row: int, kwargs: dict[str, Any]) -> str | None:
        if self.target_column is None:
            return self.target_text(prompt)
        if self.target_column not in kwargs:
            raise ValueError(f"`target_column={self.target_column!r}` is not among the call's keywords.")
        value = kwargs[self.target_column][row]
        return str(value) if value is not None and str(value) else None

    def _applies(self, row, prompts, kwargs):
        return self._target(prompts[row], row, kwargs) is not None

    def _load(self, device: torch.device) -> None:
        if self.ocr_fn is not None:
            return
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:
            raise _missing("OCRScore", "rapidocr-onnxruntime", "ocr") from err
        import numpy as np

        engine = RapidOCR(**self.engine_kwargs)

        def read(image: Any) -> str:
            result, _ = engine(np.asarray(image))
            return " ".join(str(r[1]) for r in result or [])

        self.ocr_fn = read

    def _normalize(self, text: str) -> str:
        if self.ignore_case:
            text = text.lower()
        return re.sub(r"\s+", "" if self.ignore_spaces else " ", text).strip()

    def score_text(self, read: str, target: str) -> float:
        """The reward of OCR output ``read`` for ``target`` (both normalised here)."""
        read, target = self._normalize(read), self._normalize(target)
        if self.variant == "flow_grpo":
            if target in read:
                return 1.0
            return 1.0 - min(edit_distance(read, target), len(target)) / max(len(target), 1)
        longest = max(len(read), len(target))
        return 1.0 if longest == 0 else min(max(1.0 - edit_distance(read, target) / longest, 0.0), 1.0)

    def _score(self, prompts, images, rows, kwargs, device):
        return [
            self.score_text(self.ocr_fn(im), self._target(p, r, kwargs))
            for p, im, r in zip(prompts, images, rows, strict=True)
        ]


clip_score = CLIPScore()
"""CLIPScore with ``openai/clip-vit-large-patch14`` (loaded on first call)."""

pick_score = PickScore()
"""PickScore with ``yuvalkirstain/PickScore_v1`` (loaded on first call)."""

ocr_score = OCRScore()
"""Text-rendering accuracy with RapidOCR (loaded on first call)."""
