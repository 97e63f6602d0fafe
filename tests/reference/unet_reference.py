"""PyTorch side of the U-Net parity and import tests. Runs in the REFERENCE venv.

The main environment never imports torch: tests/test_unet1d_parity.py starts this file with
the reference interpreter and reads back what it writes. The U-Net is audio-diffusion-pytorch
0.0.43's `UNet1d` (the MSLDM release's denoiser); KWARGS below is a JSON object of its
constructor arguments (the release's, or smaller).

  python unet_reference.py parity KWARGS OUT.npz
      The U-Net with seeded weights (norm scales and biases moved off 1 and 0 so that a
      misplaced one shows), random inputs at three σ: its state dict (`state/KEY`), `x`,
      `c_noise`, `output`, and `meta` (JSON: parameter count, torch version).
  python unet_reference.py count KWARGS
      Prints the package's parameter count for KWARGS (built on the meta device: no memory).
  python unet_reference.py checkpoint KWARGS OUT.ckpt OUT.npz [--other_model] [--drop_key=K]
      The same U-Net saved the way the release's trainer saves it: a PyTorch Lightning
      checkpoint of `main.module_base_latent.Model` (state dict keys `model.unet.*` and
      `model.diffusion.net.*`, the same tensors twice; `hyper_parameters` holding a pickled
      `main.diffusion.UniformDistribution` object as Hydra leaves it), and its outputs.
      --other_model: another Lightning module's weights instead; --drop_key: without the
      U-Net's tensor K (both copies).
  python unet_reference.py sample CKPT KWARGS IN.npz OUT.npz
      The release notebook's `generate_track` (Euler with churn, optional partial
      generation) with the denoiser of CKPT, on noises given in IN.npz (`init`, `churn`,
      `inject` [steps, ...], `sigmas`, optional `source` and `mask`): x after every step
      (`trajectory`) and the result (`output`).
"""

import argparse
import json
import math
import sys
import types

import numpy as np
import torch
from torch import nn

from audio_diffusion_pytorch.modules import UNet1d

SIGMA_DATA = 0.4  # The release's diffusion_sigma_data.


def build_unet(kwargs_json):
  kwargs = json.loads(kwargs_json)
  return UNet1d(**kwargs)


def _randomise(module, generator):
  """Norm scales away from 1 and biases away from 0, so that each is exercised."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith(".g") or name.endswith("groupnorm.weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=generator))
      elif name.endswith("groupnorm.bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def seeded_unet(kwargs_json):
  torch.manual_seed(0)
  net = build_unet(kwargs_json)
  _randomise(net, torch.Generator().manual_seed(1))
  return net.eval()


def _inputs(net, frames, generator):
  in_channels = net.to_in.module_list[0].block.block1.groupnorm.num_channels
  x = torch.randn(3, in_channels, frames, generator=generator)
  sigmas = torch.tensor([0.02, 0.5, 3.0])
  c_in = (sigmas**2 + SIGMA_DATA**2)**-0.5
  return c_in[:, None, None] * (x + sigmas[:, None, None] * torch.randn(
      x.shape, generator=generator)), torch.log(sigmas) / 4


def _state_numpy(module):
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def run_parity(kwargs_json, frames, out_path):
  net = seeded_unet(kwargs_json)
  x, c_noise = _inputs(net, frames, torch.Generator().manual_seed(2))
  with torch.inference_mode():
    y = net(x, c_noise)
  arrays = {f"state/{k}": v for k, v in _state_numpy(net).items()}
  meta = dict(num_params=sum(p.numel() for p in net.parameters()),
              torch_version=torch.__version__)
  np.savez(out_path, meta=np.array(json.dumps(meta)), x=x.numpy(), c_noise=c_noise.numpy(),
           output=y.numpy(), **arrays)


# -- The release's Lightning checkpoint ------------------------------------------------------


class _Diffusion(nn.Module):
  """main.diffusion.Diffusion's registered submodule: `net` (the U-Net itself)."""

  def __init__(self, net):
    super().__init__()
    self.net = net


class _AudioDiffusionModel(nn.Module):
  """main.model.Model1d's submodules: `unet` and `diffusion` (whose net is the same U-Net)."""

  def __init__(self, net):
    super().__init__()
    self.unet = net
    self.diffusion = _Diffusion(net)


class _LightningModel(nn.Module):
  """main.module_base_latent.Model's submodule: `model`."""

  def __init__(self, net):
    super().__init__()
    self.model = _AudioDiffusionModel(net)


def _release_distribution_class():
  """A stand-in for the release's main.diffusion.UniformDistribution, registered under that
  name (as when the release's code is importable) so that torch can pickle and load it."""
  if "main.diffusion" in sys.modules:
    return sys.modules["main.diffusion"].UniformDistribution
  module = types.ModuleType("main.diffusion")
  sys.modules.setdefault("main", types.ModuleType("main"))
  sys.modules["main.diffusion"] = module

  class UniformDistribution:
    def __init__(self, vmin, vmax):
      self.vmin, self.vmax = vmin, vmax

  UniformDistribution.__module__ = "main.diffusion"
  UniformDistribution.__qualname__ = "UniformDistribution"
  module.UniformDistribution = UniformDistribution
  return UniformDistribution


def _release_hyper_parameters(kwargs):
  """What save_hyperparameters() records for the release: its yaml's model section, with
  the σ distribution a Hydra-instantiated object of the release's own class."""
  return dict(learning_rate=2e-5, beta1=0.9, beta2=0.99, **kwargs,
              diffusion_sigma_distribution=_release_distribution_class()(0.0, 3.0),
              diffusion_sigma_data=SIGMA_DATA)


class _OtherLightningModel(nn.Module):
  """Some other Lightning module (an autoencoder), for the importer's refusal."""

  def __init__(self):
    super().__init__()
    self.model = nn.Module()
    self.model.encoder = nn.Conv1d(4, 8, 3)
    self.model.decoder = nn.ConvTranspose1d(8, 4, 3)


def run_checkpoint(kwargs_json, frames, ckpt_path, npz_path, other_model=False, drop_key=""):
  net = seeded_unet(kwargs_json)
  state = (_OtherLightningModel() if other_model else _LightningModel(net)).state_dict()
  if drop_key:  # Both copies of it.
    state = {k: v for k, v in state.items() if not k.endswith("." + drop_key)}
  torch.save({
      "epoch": 12, "global_step": 48_000, "pytorch-lightning_version": "1.7.7",
      "state_dict": state, "hparams_name": "kwargs",
      "hyper_parameters": _release_hyper_parameters(json.loads(kwargs_json)),
      "loops": {}, "callbacks": {},
  }, ckpt_path)
  x, c_noise = _inputs(net, frames, torch.Generator().manual_seed(3))
  with torch.inference_mode():
    y = net(x, c_noise)
  np.savez(npz_path, x=x.numpy(), c_noise=c_noise.numpy(), output=y.numpy())


# -- The release notebook's sampler ----------------------------------------------------------


def _load_denoiser(ckpt_path, kwargs_json):
  net = build_unet(kwargs_json)
  _release_distribution_class()
  checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
  prefix = "model.diffusion.net."
  net.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                       if k.startswith(prefix)})
  net.eval()

  def denoise_fn(x, sigma):
    # main.diffusion.Diffusion.denoise_fn with a scalar σ.
    sigmas = torch.full((x.shape[0],), float(sigma))
    padded = sigmas[:, None, None]
    c_skip = SIGMA_DATA**2 / (padded**2 + SIGMA_DATA**2)
    c_out = padded * SIGMA_DATA * (SIGMA_DATA**2 + padded**2)**-0.5
    c_in = (padded**2 + SIGMA_DATA**2)**-0.5
    c_noise = torch.log(sigmas) * 0.25
    return c_skip * x + c_out * net(c_in * x, c_noise)

  return denoise_fn


def generate_track(denoise_fn, sigmas, init, churn, inject, source=None, mask=None,
                   s_churn=20.0):
  """The notebook's generate_track with num_resamples=1, its two torch.randn_like draws
  replaced by the given noises (inject[i] for the source, churn[i] for the churn)."""
  x = sigmas[0] * init
  source = torch.zeros_like(x) if source is None else source
  mask = torch.zeros_like(x) if mask is None else mask
  gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1)
  trajectory = []
  for i in range(len(sigmas) - 1):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    noisy_source = source + sigma * inject[i]
    x = mask * noisy_source + (1.0 - mask) * x
    sigma_hat = sigma * (gamma + 1)
    x_hat = x + churn[i] * (sigma_hat**2 - sigma**2)**0.5
    d = (x_hat - denoise_fn(x_hat, sigma=sigma_hat)) / sigma_hat
    x = x_hat + d * (sigma_next - sigma_hat)
    trajectory.append(x.clone())
  return mask * source + (1.0 - mask) * x, torch.stack(trajectory)


def run_sample(ckpt_path, kwargs_json, in_path, out_path):
  denoise_fn = _load_denoiser(ckpt_path, kwargs_json)
  with np.load(in_path) as data:
    given = {k: torch.from_numpy(data[k]) for k in data.files}
  with torch.inference_mode():
    output, trajectory = generate_track(
        denoise_fn, given["sigmas"], given["init"], given["churn"], given["inject"],
        given.get("source"), given.get("mask"))
  np.savez(out_path, output=output.numpy(), trajectory=trajectory.numpy())


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  parity = commands.add_parser("parity")
  parity.add_argument("kwargs")
  parity.add_argument("out")
  parity.add_argument("--frames", type=int, default=64)
  count = commands.add_parser("count")
  count.add_argument("kwargs")
  checkpoint = commands.add_parser("checkpoint")
  checkpoint.add_argument("kwargs")
  checkpoint.add_argument("ckpt")
  checkpoint.add_argument("out")
  checkpoint.add_argument("--frames", type=int, default=64)
  checkpoint.add_argument("--other_model", action="store_true")
  checkpoint.add_argument("--drop_key", default="")
  sample = commands.add_parser("sample")
  sample.add_argument("ckpt")
  sample.add_argument("kwargs")
  sample.add_argument("inputs")
  sample.add_argument("out")
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  if args.command == "count":
    with torch.device("meta"):
      print(sum(p.numel() for p in build_unet(args.kwargs).parameters()))
  elif args.command == "parity":
    run_parity(args.kwargs, args.frames, args.out)
  elif args.command == "checkpoint":
    run_checkpoint(args.kwargs, args.frames, args.ckpt, args.out, args.other_model,
                   args.drop_key)
  else:
    run_sample(args.ckpt, args.kwargs, args.inputs, args.out)


if __name__ == "__main__":
  main()
