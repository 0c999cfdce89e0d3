"""The ``--demo`` model's denoiser: hand-designed, so that a model built in seconds visibly listens.

Real Stable Diffusion learned, from billions of pictures, which picture a conditioning asks for.
The demo model is told instead: :class:`DemoDenoiser` is the exact denoiser of a Gaussian picture
prior whose mean, :func:`prior_mean`, is drawn from a handful of statistics of the conditioning
(:func:`course_descriptors`, :func:`offset_descriptors`). With the demo's block-mean autoencoder
(:class:`ldm.models.autoencoder.BlockMeanAutoencoder`) the latent channels are picture channels:
luminance, two colour-opponent channels and sharpness, at 1/8 of the picture's size, times
``latent_scale``. So:

- *what moves together in the sound* (the coherent time course of the conditioning's rows: a
  hit, a swell, a rhythm inside the slice) sets a bright blob (its strength; where in the slice
  the energy lies sets where the blob sits), the overall brightness (rising or falling course)
  and a plaid of luminance waves (the course's rhythm: one wave per rate);
- *which columns move with it* (bass or treble bands for fft/mel features) sets the colour;
- a text prompt mixed in (it moves the columns' means, which ``--normalize clip`` keeps at the
  empty prompt's for a sound) tilts the light and casts a colour;
- the seed draws the texture: a sample of a smooth stationary Gaussian field around that mean.

Everything is measured against the empty prompt's conditioning (``null_context``, set by the
loader): the unconditional picture is a plain grey field, and classifier-free guidance scales
how far a sound takes the picture from it, as with real weights. The block layout of a small
random :class:`UNetModel` is kept, its output added with weight ``unet_weight``, so that network
bending inside UNet blocks (``--bend OP=A@output_blocks.N``) still has blocks to act on.

A random UNet's share of the prediction is too small for a bend inside it to show (about
0.01/255 of the picture), so the demo makes block bends visible another way: when a forward hook
changes a block's output (a bend does; nothing else here does), the change, relative to the
block's RMS activation, is drawn into the picture the denoiser is asked for
(:func:`bend_picture`): each group of 4 channels read as the 4 picture channels (luminance, two
colours, sharpness), as the channel operators read them, averaged over the groups and resized to
the latent. ``dilate`` grows bright shapes, ``erode`` dark ones, ``add`` brightens, ``rotate_z``
turns colours. Without a bend (or at an identity amount, where the hook returns the block's own
output) nothing of this is computed: un-bent outputs are those of the prior and the UNet alone.

Why ``latent_scale`` (6 in the demo's config, the autoencoder's too): the prior's texture then
spreads about 1 in latent units, as Stable Diffusion's latents do, so img2img keeps or forgets
the previous frame as it does with real weights: much at ``--strength 0.2``, little at 0.8.
In picture units the prior is the same; at scale 1 its narrow texture would be drowned by the
noise of any strength, and every img2img frame redrawn from scratch whatever ``--strength``
says (frame change following the music only through the conditioning).

Shapes: x ``(B, 4, h, w)`` diffusion latents; timesteps ``(B,)`` in [0, 1000); context
``(B, 77, D)``.
"""
import math

import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import make_beta_schedule

# Prior standard deviation of each picture channel (luminance, colour 1, colour 2, sharpness) and
# the correlation length of the texture: soft clouds, not pixel noise. A narrow prior keeps two
# seeds of one sound close next to two sounds (README, "The demo model").
PRIOR_STD = (0.12, 0.07, 0.07, 0.1)
CORRELATION_LENGTH = 1 / 8  # of the picture's shorter side
# Amplitudes of the picture's parts in picture units, before guidance multiplies them (7.5 by
# default): a brightness shift, a blob, the waves, a colour cast.
BRIGHTNESS, BLOB, WAVES, COLOUR = 0.065, 0.2, 0.08, 0.09
N_WAVES = 6  # rates 1 .. N_WAVES half-cycles per slice in the time course
# Picture units per unit of a block bend's change relative to the block's RMS activation.
BEND_GAIN = 0.25


def course_descriptors(context: torch.Tensor) -> torch.Tensor:
    """Statistics of the rows of a conditioning ``(B, 77, D)`` -> ``(B, 5 + N_WAVES)`` float32.

    Row 0 (the begin-of-text row, the same for every prompt) is left out. Each column of rows
    1..76 is standardized over the rows (a column that does not vary counts as zeros), so these
    statistics do not depend on the columns' scale: ``--normalize clip`` and raw features of the
    same sound agree. With ``Z`` those columns ``(76, D)`` and ``g = Z.mean(columns)`` the
    course that the columns share:

    0. ``rms(g)``: how strongly the columns move together (0 for independent noise, 1 when all
       columns follow one course);
    1. the energy centroid of ``g`` in time, in [-0.5, 0.5], times ``rms(g)``;
    2. the trend of ``g`` (its first cosine coefficient): rising or falling;
    3-4. the first two cosine coefficients over columns of each column's covariance with ``g``:
       whether low or high columns (bass or treble bands) follow the course, or the middle ones;
    5.. the cosine coefficients 2 .. N_WAVES + 1 of ``g``: its rhythm inside the slice.

    Coefficients are of orthonormal cosine bases, divided by the square root of the length, so
    each lies in [-1, 1].
    """
    x = context[:, 1:].float()
    rows, cols = x.shape[1:]
    centred = x - x.mean(dim=1, keepdim=True)
    std = centred.square().mean(dim=1, keepdim=True).sqrt()
    flat = std <= 1e-6 * x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    z = torch.where(flat, 0.0, centred / torch.where(flat, 1.0, std))
    course = z.mean(dim=2)  # (B, 76): the course the columns share
    strength = course.square().mean(dim=1).sqrt()
    energy = course.square()
    when = torch.linspace(-0.5, 0.5, rows, device=x.device)
    centroid = (energy * when).sum(dim=1) / energy.sum(dim=1).clamp_min(1e-12) * strength
    course_coefficients = course @ _cosine_basis(rows, N_WAVES + 2, x.device).T / math.sqrt(rows)
    follow = (z * course[:, :, None]).mean(dim=1)  # (B, D): covariance of each column with g
    follow_coefficients = follow @ _cosine_basis(cols, 3, x.device)[1:].T / math.sqrt(cols)
    return torch.cat([strength[:, None], centroid[:, None], course_coefficients[:, 1:2],
                      follow_coefficients, course_coefficients[:, 2:]], dim=1)


def offset_descriptors(context: torch.Tensor, null_means: torch.Tensor, null_spread: torch.Tensor,
                       directions: torch.Tensor) -> torch.Tensor:
    """How far the column means of rows 1..76 of ``context`` ``(B, 77, D)`` lie from the empty
    prompt's ``null_means`` ``(D,)``, in units of its mean column spread ``null_spread`` (a
    scalar), along the unit ``directions`` ``(3, D)`` -> ``(B, 3)``. What a text prompt moves;
    zero for a sound's conditioning with ``--normalize clip``, which gives every column the
    empty prompt's mean."""
    return (context[:, 1:].float().mean(dim=1) - null_means) / null_spread @ directions.T


# Gains of the descriptors' differences from the empty prompt's before tanh: about 1 for the
# spread seen over real recordings and features (course) and over prompts (offset).
COURSE_GAINS = (3.0, 10.0, 6.0, 10.0, 15.0) + (10.0,) * N_WAVES
OFFSET_GAIN = 0.7


def prior_mean(course: torch.Tensor, offset: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The picture the conditioning asks for: ``(B, 4, height, width)`` picture channels, float32.

    ``course`` ``(B, 5 + N_WAVES)`` and ``offset`` ``(B, 3)``: the descriptors' differences from
    the empty prompt's, scaled and bounded by tanh (:meth:`DemoDenoiser.asked`). All zero gives
    zero, a plain grey field; otherwise the parts the module documentation describes.
    """
    device = course.device
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    size = min(height, width)
    x, y = (x - 0.5) * width / size, (y - 0.5) * height / size  # square units, 0 at the centre

    def per_sample(values):  # (B,) -> (B, 1, 1) against the (h, w) grid
        return values[:, None, None]

    # The blob: as strong as the course, where the course's energy lies (left = early in the
    # slice), high when treble columns follow the course, low for bass.
    blob_x, blob_y = 0.35 * per_sample(course[:, 1]), -0.35 * per_sample(course[:, 3])
    blob = torch.exp(-((x - blob_x) ** 2 + (y - blob_y) ** 2) / (2 * 0.22**2))
    waves = torch.zeros_like(blob)
    for k in range(N_WAVES):
        angle = 2.39996 * (k + 1)  # golden-angle steps: every rate has its own direction
        cycles = 0.75 + 0.35 * k
        phase = 2 * math.pi * cycles * (x * math.cos(angle) + y * math.sin(angle)) + k
        waves = waves + per_sample(course[:, 5 + k]) * torch.cos(phase)
    # A prompt tilts the light across the picture and casts a colour.
    tilt = per_sample(offset[:, 0]) * (x * 0.8 + y * 0.6)
    luminance = (BRIGHTNESS * per_sample(course[:, 2]) + BLOB * per_sample(course[:, 0]) * blob
                 + WAVES * waves + BRIGHTNESS * tilt)
    colour_1 = COLOUR * (per_sample(course[:, 3]) * (0.4 + blob) + per_sample(offset[:, 1]))
    colour_2 = COLOUR * (per_sample(course[:, 4]) * (0.4 + blob) + per_sample(offset[:, 2]))
    sharpness = 0.5 * WAVES * waves.abs()
    return torch.stack([luminance, colour_1, colour_2, sharpness], dim=1)


def bend_picture(changes: list[tuple[torch.Tensor, torch.Tensor]], height: int, width: int) -> torch.Tensor:
    """What block bends add to the asked-for picture: ``(B, 4, height, width)`` picture channels,
    float32, from ``changes``, the (before, after) outputs ``(B, C, h', w')`` of the blocks whose
    hooks changed them. Each change is divided by its block's RMS output (per batch item), its
    channels read in groups of 4 as the 4 picture channels and averaged over the groups (fewer than
    4 channels: their mean on all 4), resized to (height, width) bilinearly and summed, times
    :data:`BEND_GAIN`."""
    total = None
    for before, after in changes:
        before = before.float()
        scale = before.square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
        change = (after.float() - before) / scale
        groups = change.shape[1] // 4
        if groups:
            four = change[:, :4 * groups].unflatten(1, (groups, 4)).mean(dim=1)
        else:
            four = change.mean(dim=1, keepdim=True).expand(-1, 4, -1, -1)
        picture = torch.nn.functional.interpolate(four, size=(height, width), mode="bilinear", align_corners=False)
        total = picture if total is None else total + picture
    return BEND_GAIN * total


def texture_spectrum(height: int, width: int, device) -> torch.Tensor:
    """Per-channel variance of each Fourier mode of the prior's texture, ``(4, height, width // 2 + 1)``,
    in picture units, for ``torch.fft.rfft2(..., norm="ortho")``: a smooth field whose pixels have
    variance ``PRIOR_STD ** 2``."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    length = CORRELATION_LENGTH * min(height, width)
    shape = 1.0 / (1.0 + (length * 2 * math.pi) ** 2 * (fx**2 + fy**2)) ** 2
    # Mean over all modes of the full spectrum = pixel variance (Parseval, ortho norm); the
    # rfft half counts its inner columns twice.
    weights = torch.full_like(shape, 2.0)
    weights[:, 0] = 1.0
    if width % 2 == 0:
        weights[:, -1] = 1.0
    shape = shape * (height * width) / (shape * weights).sum()
    # Filled on the device, not copied from the host: a CUDA graph can capture this (--cuda_graphs).
    std = torch.stack([torch.full((), value, dtype=torch.float32, device=device) for value in PRIOR_STD])
    return std[:, None, None] ** 2 * shape


def gaussian_denoiser_eps(x: torch.Tensor, alpha_bar: torch.Tensor, mean: torch.Tensor,
                          spectrum: torch.Tensor) -> torch.Tensor:
    """The noise in ``x`` ``(B, 4, h, w)`` for a Gaussian prior with mean ``mean`` ``(B, 4, h, w)``
    and per-mode variances ``spectrum`` ``(4, h, w // 2 + 1)`` (as :func:`texture_spectrum`), at
    the noise level ``alpha_bar`` ``(B,)`` (x = sqrt(a) x0 + sqrt(1 - a) eps).

    The posterior mean of x0 is exact for that prior: per Fourier mode, a Wiener gain
    ``sqrt(a) P / (a P + 1 - a)`` on ``x - sqrt(a) mean``."""
    a = alpha_bar.float()[:, None, None, None]
    residual = torch.fft.rfft2(x.float() - a.sqrt() * mean, norm="ortho")
    gain = a.sqrt() * spectrum / (a * spectrum + 1 - a)
    x0 = mean + torch.fft.irfft2(gain * residual, s=x.shape[-2:], norm="ortho")
    return (x.float() - a.sqrt() * x0) / (1 - a).sqrt()


class DemoDenoiser(UNetModel):
    """A :class:`UNetModel` (same arguments and block names) whose prediction is the exact
    Gaussian-prior denoiser of this module plus ``unet_weight`` times the UNet's own.

    ``linear_start``, ``linear_end``, ``timesteps``: the LatentDiffusion's noise schedule (the
    denoiser needs each timestep's noise level); ``latent_scale``: the autoencoder's, latents
    are that many times the picture channels. The empty prompt's conditioning is set with
    :meth:`set_null_context` once the text encoder exists. Block bends are drawn into the picture
    by :func:`bend_picture` (see the module documentation)."""

    def __init__(self, *, unet_weight=0.05, latent_scale=1.0, linear_start=0.00085, linear_end=0.012,
                 timesteps=1000, **unet):
        super().__init__(**unet)
        self.unet_weight, self.latent_scale = unet_weight, latent_scale
        betas = torch.as_tensor(make_beta_schedule("linear", timesteps, linear_start, linear_end))
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)
        self.register_buffer("course_gains", torch.tensor(COURSE_GAINS), persistent=False)
        directions = torch.randn(3, unet["context_dim"], generator=torch.Generator().manual_seed(1))
        self.register_buffer("offset_directions", directions / directions.norm(dim=1, keepdim=True),
                             persistent=False)
        # The empty prompt's statistics (set_null_context); until then those of all-zero rows.
        self.register_buffer("null_course", torch.zeros(len(COURSE_GAINS)), persistent=False)
        self.register_buffer("null_means", torch.zeros(unet["context_dim"]), persistent=False)
        self.register_buffer("null_spread", torch.ones(()), persistent=False)
        # Each block's own output, kept by a hook that runs before any other (a bend's) hook, so
        # that run_block sees what the other hooks changed.
        self._own_output, self._bent = {}, []
        for block in (*self.input_blocks, self.middle_block, *self.output_blocks):
            block.register_forward_hook(self._keep_own_output, prepend=True)

    def _keep_own_output(self, block, _inputs, output):
        self._own_output[block] = output

    def run_block(self, block, h, emb, context):
        """The block's output after its hooks; when they changed it, (own, changed) is noted."""
        output = super().run_block(block, h, emb, context)
        own = self._own_output.pop(block, output)
        if output is not own:
            self._bent.append((own, output))
        return output

    @torch.no_grad()
    def set_null_context(self, null_context: torch.Tensor) -> None:
        """Measure everything against ``null_context``, the empty prompt's conditioning ``(77, D)``
        (or ``(1, 77, D)``)."""
        rows = null_context.reshape(-1, *null_context.shape[-2:])[:1].float()
        self.null_course.copy_(course_descriptors(rows)[0])
        self.null_means.copy_(rows[0, 1:].mean(dim=0))
        self.null_spread.copy_(rows[0, 1:].std(dim=0).mean().clamp_min(1e-12))

    def asked(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The descriptors of ``context`` ``(B, 77, D)`` against the empty prompt's, scaled and
        bounded by tanh: ``(B, 5 + N_WAVES)`` course parts and ``(B, 3)`` offset parts."""
        course = torch.tanh((course_descriptors(context) - self.null_course.float()) * self.course_gains.float())
        offset = offset_descriptors(context, self.null_means.float(), self.null_spread.float(),
                                    self.offset_directions.float())
        return course, torch.tanh(OFFSET_GAIN * offset)

    def forward(self, x, timesteps, context=None):
        """As :meth:`UNetModel.forward`: the noise in x, ``(B, 4, h, w)`` in x's dtype."""
        self._bent = []
        learned = super().forward(x, timesteps, context)
        bent, self._bent = self._bent, []
        self._own_output.clear()
        height, width = x.shape[-2:]
        mean = self.latent_scale * prior_mean(*self.asked(context), height, width)
        if bent:
            mean = mean + self.latent_scale * bend_picture(bent, height, width)
        spectrum = self.latent_scale**2 * texture_spectrum(height, width, x.device)
        eps = gaussian_denoiser_eps(x, self.alphas_cumprod[timesteps.long()], mean, spectrum)
        return (eps + self.unet_weight * learned.float()).to(x.dtype)


def _cosine_basis(n: int, k: int, device) -> torch.Tensor:
    """The first ``k`` orthonormal DCT-II vectors of length ``n``, ``(k, n)``."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    basis = torch.stack([torch.cos(math.pi * j * (i + 0.5) / n) for j in range(k)])
    return basis / basis.norm(dim=1, keepdim=True)
