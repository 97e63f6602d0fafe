"""PyTorch side of benchmarks/ldm.py: the release's denoiser. Runs in the REFERENCE venv.

  python benchmarks/ldm_reference.py unet KWARGS --evals=3 --steps=3 --threads=2
      Builds audio-diffusion-pytorch 0.0.43's UNet1d with the constructor arguments KWARGS
      (JSON; benchmarks/ldm.py passes the release's), random weights, float32, eval mode
      (`--bf16` runs it under CPU autocast to bfloat16), then under torch.inference_mode
      times `--evals` single denoiser evaluations D(x; σ) on one joint latent
      [1, 320, 1024], and `--steps` steps of the release notebook's Euler-churn loop
      (`generate_track`: churn noise, one evaluation, Euler update). Prints one JSON line.
  python benchmarks/ldm_reference.py unet_bench KWARGS --batches=1,4 --train_batch=2
      The U-Net of the constructor arguments KWARGS (JSON; the release's sizes come from
      msldm_jax.models.unet1d.package_kwargs) in float32 (`--bf16`: under CPU autocast):
      forward passes at each batch and
      training steps (EDM loss, backward, Adam), the side (c) of benchmarks/ldm.py compares
      with ours. Prints one JSON line.
  python benchmarks/ldm_reference.py decoder --stems=1 --threads=2
      The release's SourceVAE decoder (tests/reference/dac_reference.py builds it from DAC's
      blocks: 1536 wide, strides 8·5·4·2, no final tanh; random weights) decoding `--stems`
      latents [stems, 80, 1024] in one call (`--bf16`: under CPU autocast), as the
      release's notebook decodes a piece's four stems, after a warm-up call on a short
      latent.
Times are wall-clock and this process's CPU time (user + system, all threads): on a machine
that other work also loads, the CPU time is the steadier of the two.

The main environment never imports torch: benchmarks/ldm.py starts this file with the
reference interpreter and parses its output. Install: tests/reference/install_reference_env.sh
(audio-diffusion-pytorch==0.0.43 and einops-exts, both --no-deps: the package's modules.py
imports only torch, einops and einops_exts; its other declared dependency,
data-science-types, is type stubs).

The U-Net's settings come from the caller: benchmarks/ldm.py passes
`msldm_jax.models.unet1d.package_kwargs` of the `release` preset (XZWY/MSLDM's
`msldm/exp/train_msldm.yaml` model section over `msldm/main/model.py:get_default_model_kwargs`;
364.4 M parameters), the one place those numbers are written. The preconditioning is the release's
EDM form with σ_data = 0.4 and no clamping of the denoised latent (reference §5).
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

SIGMA_DATA = 0.4


def karras_sigmas(num_steps, sigma_min=0.01, sigma_max=3.0, rho=7.0):
  ramp = torch.linspace(0, 1, num_steps)
  sigmas = (sigma_max**(1 / rho) + ramp * (sigma_min**(1 / rho) - sigma_max**(1 / rho)))**rho
  return torch.cat([sigmas, torch.zeros(1)])


def make_denoise_fn(net):
  def denoise_fn(x, sigma):
    sigma = float(sigma)
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / math.sqrt(sigma**2 + SIGMA_DATA**2)
    c_in = 1 / math.sqrt(sigma**2 + SIGMA_DATA**2)
    c_noise = torch.full((x.shape[0],), math.log(sigma) / 4)
    return c_skip * x + c_out * net(c_in * x, c_noise)
  return denoise_fn


def euler_churn_steps(denoise_fn, x, sigmas, s_churn=20.0):
  """The release notebook's `generate_track` loop body, one resample pass per step."""
  gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1)
  for i in range(len(sigmas) - 1):
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    sigma_hat = sigma * (gamma + 1)
    x_hat = x + torch.randn_like(x) * (sigma_hat**2 - sigma**2)**0.5
    d = (x_hat - denoise_fn(x_hat, sigma_hat)) / sigma_hat
    x = x_hat + d * (sigma_next - sigma_hat)
  return x


def _timed(fn, *args):
  """(wall seconds, process CPU seconds) of fn(*args)."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn(*args)
  return time.perf_counter() - wall, time.process_time() - cpu


def run_unet(kwargs_json, evals, steps, threads, frames, bf16):
  from audio_diffusion_pytorch.modules import UNet1d  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  kwargs = json.loads(kwargs_json)
  net = UNet1d(**kwargs).eval()
  num_params = sum(p.numel() for p in net.parameters())
  denoise_fn = make_denoise_fn(net)
  x = 3.0 * torch.randn(1, kwargs["in_channels"], frames)
  # bf16: torch's CPU autocast (bfloat16 matmuls and convolutions through oneDNN, which
  # uses the CPU's bf16 units where it has them), the release's mixed-precision path.
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
  with torch.inference_mode(), autocast:
    denoise_fn(x, 1.0)  # Warm-up: first-call allocations.
    evals = [_timed(denoise_fn, x, 1.0) for _ in range(evals)]
    # A `steps`-step schedule: same cost per step as the 150-step one.
    wall, cpu = _timed(euler_churn_steps, denoise_fn, x, karras_sigmas(steps))
  print(json.dumps(dict(
      num_params=num_params, frames=frames, threads=torch.get_num_threads(),
      compute_dtype="bfloat16 (autocast)" if bf16 else "float32",
      eval_times=[t for t, _ in evals], eval_cpu=[c for _, c in evals],
      step_times=[wall / steps], step_cpu=[cpu / steps], torch_version=torch.__version__,
      python=platform.python_version())))


def run_unet_bench(kwargs_json, batches, train_batch, repeats, threads, frames, bf16):
  """The package's UNet1d with the given constructor arguments (tests/reference's, from
  msldm_jax.models.unet1d.package_kwargs), parameters in float32: forward passes at each
  batch size under inference_mode, and training steps at `train_batch` (EDM loss on the
  network's output as the release's Diffusion computes it, backward, torch.optim.Adam(2e-5,
  (0.9, 0.99)) as its Lightning module configures). `bf16`: the forwards (the training
  step's too) under torch.autocast(cpu, bfloat16), torch's mixed precision; the loss and
  Adam stay float32, as with a GradScaler-free bf16 autocast recipe. One untimed warm-up of
  each first."""
  from audio_diffusion_pytorch.modules import UNet1d  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  kwargs = json.loads(kwargs_json)
  net = UNet1d(**kwargs)
  num_params = sum(p.numel() for p in net.parameters())
  channels = kwargs["in_channels"]
  forward = {}
  net.eval()
  autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # pylint: disable=unnecessary-lambda-assignment
  with torch.inference_mode(), autocast():
    for batch in batches:
      x = torch.randn(batch, channels, frames)
      c_noise = torch.full((batch,), math.log(0.5) / 4)
      net(x, c_noise)
      forward[batch] = [_timed(net, x, c_noise) for _ in range(repeats)]
  net.train()
  optimizer = torch.optim.Adam(net.parameters(), lr=2e-5, betas=(0.9, 0.99))
  x = 0.5 * torch.randn(train_batch, channels, frames)
  sigmas = 3.0 * torch.rand(train_batch)
  noise = torch.randn_like(x)

  def step():
    padded = sigmas[:, None, None]
    c_skip = SIGMA_DATA**2 / (padded**2 + SIGMA_DATA**2)
    c_out = padded * SIGMA_DATA / (padded**2 + SIGMA_DATA**2)**0.5
    c_in = 1 / (padded**2 + SIGMA_DATA**2)**0.5
    x_noisy = x + padded * noise
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      out = net(c_in * x_noisy, torch.log(sigmas) / 4)
    loss = torch.mean((out.float() - (x - c_skip * x_noisy) / c_out)**2)
    loss.backward()
    optimizer.step()

  step()
  train = [_timed(step) for _ in range(repeats)]
  print(json.dumps(dict(
      num_params=num_params, frames=frames, threads=torch.get_num_threads(),
      forward={str(b): dict(wall=[w for w, _ in t], cpu=[c for _, c in t])
               for b, t in forward.items()},
      train=dict(batch=train_batch, wall=[w for w, _ in train], cpu=[c for _, c in train]),
      compute_dtype="bfloat16 (autocast)" if bf16 else "float32", torch_version=torch.__version__, python=platform.python_version())))


def run_decoder(stems, threads, frames, bf16):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                  "reference"))
  import dac_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  _, dac_model = dac_reference.load_dac()
  vae = dac_reference.ReleaseSourceVAE(dac_model, 64, (2, 4, 5, 8), 80, 1536, (8, 5, 4, 2))
  decoder = vae.decoder.eval()
  num_params = sum(p.numel() for p in decoder.parameters())
  z = 0.5 * torch.randn(stems, 80, frames)
  with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    decoder(z[:1, :, :32])  # Warm-up.
    wall, cpu = _timed(decoder, z)
    samples = decoder(z[:1, :, :8]).shape[-1]
  print(json.dumps(dict(
      num_params=num_params, stems=stems, frames=frames, threads=torch.get_num_threads(),
      compute_dtype="bfloat16 (autocast)" if bf16 else "float32",
      times=[wall], cpu=[cpu], short_output_samples=samples,
      torch_version=torch.__version__, python=platform.python_version())))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  unet = commands.add_parser("unet")
  unet.add_argument("kwargs", help="UNet1d constructor arguments as JSON")
  unet.add_argument("--evals", type=int, default=3)
  unet.add_argument("--steps", type=int, default=3)
  unet.add_argument("--threads", type=int, default=os.cpu_count())
  unet.add_argument("--frames", type=int, default=1024)
  unet.add_argument("--bf16", action="store_true", help="under torch.autocast(cpu, bfloat16)")
  decoder = commands.add_parser("decoder")
  decoder.add_argument("--stems", type=int, default=1)
  decoder.add_argument("--threads", type=int, default=os.cpu_count())
  decoder.add_argument("--frames", type=int, default=1024)
  decoder.add_argument("--bf16", action="store_true", help="under torch.autocast(cpu, bfloat16)")
  unet_bench = commands.add_parser("unet_bench")
  unet_bench.add_argument("kwargs", help="UNet1d constructor arguments as JSON")
  unet_bench.add_argument("--batches", default="1,4")
  unet_bench.add_argument("--train_batch", type=int, default=2)
  unet_bench.add_argument("--repeats", type=int, default=3)
  unet_bench.add_argument("--threads", type=int, default=os.cpu_count())
  unet_bench.add_argument("--frames", type=int, default=1024)
  unet_bench.add_argument("--bf16", action="store_true", help="under torch.autocast(cpu, bfloat16)")
  args = parser.parse_args()
  if args.command == "unet_bench":
    run_unet_bench(args.kwargs, [int(b) for b in args.batches.split(",")], args.train_batch,
                   args.repeats, args.threads, args.frames, args.bf16)
  elif args.command == "unet":
    run_unet(args.kwargs, args.evals, args.steps, args.threads, args.frames, args.bf16)
  else:
    run_decoder(args.stems, args.threads, args.frames, args.bf16)


if __name__ == "__main__":
  main()
