"""``--vae taesd:PATH``: the tiny autoencoder TAESD (:mod:`ldm.models.taesd`) in place of the
checkpoint's KL autoencoder, for every encode and decode of a run (frames, previews, colour
coherence, init pictures).

TAESD works on the UNet's latents (already scaled), so it swaps in for
``get_first_stage_encoding(encode_first_stage(x))`` and ``decode_first_stage(z)`` with no scale
factor; one TAESD serves SD v1.x and 2.x. The weights come from the user (madebyollin/taesd's
``taesd_encoder.pth``/``taesd_decoder.pth``, or diffusers' AutoencoderTiny folder); nothing is
downloaded. A decoder-only file is enough for runs that never encode a picture.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import CheckpointError
from ldm.models.taesd import TinyAutoencoder, load_taesd, taesd_files

from sounddiffusion.errors import ModelError, ParameterError

PREFIX = "taesd:"
_GET_IT = ("download it from madebyollin/taesd (taesd_encoder.pth and taesd_decoder.pth) or diffusers' "
           "AutoencoderTiny repository (madebyollin/taesd on the Hub)")


@dataclass(frozen=True)
class TinyVae:
    """A loaded TAESD: ``autoencoder`` on the CPU in float32, ``spec`` the ``--vae`` text it came
    from, ``hash`` :func:`weights_hash` of the weight files it read."""

    autoencoder: TinyAutoencoder
    spec: str
    hash: str

    @property
    def can_encode(self) -> bool:
        return self.autoencoder.encoder is not None


def vae_path(spec: str) -> Path:
    """PATH of ``--vae taesd:PATH``. Raises ParameterError for another form or an empty PATH."""
    if not spec.startswith(PREFIX) or not spec[len(PREFIX):].strip():
        raise ParameterError(f"--vae {spec}: give taesd:PATH, PATH a TAESD folder or file ({_GET_IT}); leave out "
                             f"--vae for the checkpoint's own autoencoder")
    return Path(spec[len(PREFIX):])


def load_tiny_vae(spec: str) -> TinyVae:
    """The TAESD of ``--vae taesd:PATH`` (a few MB: read before the model, so that its mistakes are
    found first). Raises ModelError (one line, naming the flag) for a missing path, a file that is
    not TAESD for SD v1/2 (a KL VAE, a UNet, TAESDXL...), or a folder without TAESD files."""
    path = vae_path(spec)
    if not path.exists():
        raise ModelError(f"--vae {spec}: {path} does not exist; {_GET_IT}, then pass its folder or file")
    try:
        files = taesd_files(path)
        autoencoder = load_taesd(path)
    except CheckpointError as exc:
        raise ModelError(f"--vae {spec}: {' '.join(str(exc).split())}") from None
    return TinyVae(autoencoder=autoencoder, spec=spec, hash=weights_hash(files))


def weights_hash(files: Sequence[Path]) -> str:
    """sha256 (16 hex digits) of the TAESD weight ``files`` (those :func:`ldm.models.taesd.taesd_files`
    names: what load_taesd reads), each file's name and bytes, by name order."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda file: file.name):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())  # a few MB: TAESD is small
    return digest.hexdigest()[:16]


def check_can_encode(vae: TinyVae | None, why: str) -> None:
    """Raises ModelError when ``vae`` is a decoder-only TAESD and ``why`` (e.g. "--init-img")
    needs pictures encoded."""
    if vae is not None and not vae.can_encode:
        raise ModelError(f"--vae {vae.spec} holds only TAESD's decoder, but {why} needs the encoder: pass the "
                         f"folder holding taesd_encoder.pth too, or leave out --vae")
