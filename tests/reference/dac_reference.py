"""PyTorch side of the SourceVAE parity tests and benchmark. Runs in the REFERENCE venv.

The main environment never imports torch: tests/test_source_vae_parity.py and
benchmarks/vae.py start this file with the reference interpreter
(tests/reference/install_reference_env.sh makes it) and read back what it writes.

  python dac_reference.py parity OUT.npz
      DAC's blocks (descript-audio-codec 1.0.0) at small sizes, fixed seeds, random inputs:
      every case's state dict, input and output, in one .npz (keys `CASE/input`,
      `CASE/output`, `CASE/state/TORCH_KEY`) plus `meta` (JSON: each case's constructor).
  python dac_reference.py checkpoint OUT.pt OUT.npz
      A release-shaped SourceVAE at a small size, saved the way the release's trainer saves it
      (`torch.save({'generator': state_dict})`), and its outputs on random inputs.
  python dac_reference.py decode G.pt IN.npz OUT.npz
      That SourceVAE (G.pt; its config in IN.npz) decoding IN.npz's latents into OUT.npz.
  python dac_reference.py bench --part=decoder --batch=1 --threads=2 ...
      Times the release-sized encoder or decoder (torch.inference_mode); prints one JSON line.

The release's SourceVAE (XZWY/MSLDM, SourceVAE/models/model/dac_vae.py) is DAC's Encoder with
2·latent_dim output channels (mean, logvar) and DAC's Decoder without the final Tanh; both are
built here from the package's own classes (`release_sourcevae`).
"""

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
import types

import numpy as np
import torch
from torch import nn


def load_dac():
  """Returns the modules `dac.nn.layers` and `dac.model.dac` of descript-audio-codec 1.0.0.

  The package's `dac/__init__.py` (and `dac/nn/__init__.py`, `dac/model/__init__.py`) import
  descript-audiotools, which the reference env deliberately lacks (it needs torchaudio built
  for the exact torch). So: register `dac`, `dac.nn` and `dac.model` as bare packages that
  point at the installed directories (their __init__ files never run), and, when audiotools
  is absent, stub the two names that `dac/model/dac.py` and `dac/model/base.py` import at
  module level: `AudioSignal` (only used by the DAC codec class) and `ml.BaseModel` (the DAC
  class's base; a plain nn.Module here). Encoder, Decoder and their blocks use neither.
  """
  spec = importlib.util.find_spec("dac")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("descript-audio-codec is not installed in this interpreter "
                      f"({sys.executable}); run tests/reference/install_reference_env.sh")
  root = list(spec.submodule_search_locations)[0]
  for name, path in (("dac", root), ("dac.nn", os.path.join(root, "nn")),
                     ("dac.model", os.path.join(root, "model"))):
    if name not in sys.modules:
      package = types.ModuleType(name)
      package.__path__ = [path]
      package.__package__ = name
      sys.modules[name] = package
  try:
    importlib.import_module("audiotools")
  except ImportError:
    audiotools = types.ModuleType("audiotools")
    ml = types.ModuleType("audiotools.ml")

    class AudioSignal:  # pylint: disable=too-few-public-methods
      def __init__(self, *args, **kwargs):
        raise NotImplementedError("audiotools stub: AudioSignal is not available here")

    ml.BaseModel = nn.Module
    audiotools.AudioSignal = AudioSignal
    audiotools.ml = ml
    sys.modules["audiotools"] = audiotools
    sys.modules["audiotools.ml"] = ml
  layers = importlib.import_module("dac.nn.layers")
  model = importlib.import_module("dac.model.dac")
  return layers, model


class ReleaseSourceVAE(nn.Module):
  """The release's DACVAE generator minus its codec plumbing: same submodule names/keys."""

  def __init__(self, dac_model, encoder_dim, encoder_rates, latent_dim, decoder_dim,
               decoder_rates):
    super().__init__()
    self.encoder = dac_model.Encoder(encoder_dim, list(encoder_rates), 2 * latent_dim)
    self.decoder = dac_model.Decoder(latent_dim, decoder_dim, list(decoder_rates))
    # DAC's Decoder ends in nn.Tanh (no parameters); the release's does not.
    assert isinstance(self.decoder.model[-1], nn.Tanh)
    self.decoder.model = nn.Sequential(*list(self.decoder.model)[:-1])


def _randomise(module, generator):
  """Parameters that exercise every term: α ≠ 1, g ≠ ||v||, non-zero biases.

  weight_norm starts with g = ||v||, which would hide a wrong norm axis.
  """
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("alpha"):
        p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=generator))
      elif name.endswith("weight_g"):
        p.mul_(0.5 + torch.rand(p.shape, generator=generator))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _state_dict_numpy(module):
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def parity_cases(layers, dac_model):
  """(name, constructor description, module, input shape) for each parity case."""
  cases = [
      ("snake", dict(kind="snake", channels=6), layers.Snake1d(6), (2, 6, 50)),
      ("wnconv1d", dict(kind="wnconv1d", in_channels=5, out_channels=7, kernel_size=7,
                        stride=1, dilation=3, padding=9),
       layers.WNConv1d(5, 7, kernel_size=7, dilation=3, padding=9), (2, 5, 40)),
      ("wnconv1d_strided", dict(kind="wnconv1d", in_channels=4, out_channels=8,
                                kernel_size=10, stride=5, dilation=1, padding=3),
       layers.WNConv1d(4, 8, kernel_size=10, stride=5, padding=3), (2, 4, 53)),
  ]
  for s in (2, 4, 5, 8):
    cases.append((f"wnconvtranspose1d_s{s}",
                  dict(kind="wnconvtranspose1d", in_channels=6, out_channels=4,
                       kernel_size=2 * s, stride=s, padding=math.ceil(s / 2)),
                  layers.WNConvTranspose1d(6, 4, kernel_size=2 * s, stride=s,
                                           padding=math.ceil(s / 2)),
                  (2, 6, 13)))
  cases += [
      ("residual_unit", dict(kind="residual_unit", dim=6, dilation=9),
       dac_model.ResidualUnit(6, dilation=9), (2, 6, 64)),
      ("encoder_block", dict(kind="encoder_block", dim=8, stride=4),
       dac_model.EncoderBlock(8, stride=4), (2, 4, 64)),
      ("decoder_block", dict(kind="decoder_block", input_dim=8, output_dim=4, stride=5),
       dac_model.DecoderBlock(8, 4, stride=5), (2, 8, 13)),
      # The release's encoder is DAC's with d_latent = 2·latent_dim (mean and logvar).
      ("encoder", dict(kind="encoder", d_model=4, strides=[2, 4, 5, 8], d_latent=6),
       dac_model.Encoder(4, [2, 4, 5, 8], 6), (2, 1, 320 * 6 + 17)),
      ("decoder", dict(kind="decoder", input_channel=3, channels=32, rates=[8, 5, 4, 2]),
       dac_model.Decoder(3, 32, [8, 5, 4, 2]), (2, 3, 7)),
  ]
  return cases


def run_parity(out_path):
  torch.manual_seed(0)
  layers, dac_model = load_dac()
  arrays, meta = {}, {}
  for index, (name, spec, module, shape) in enumerate(parity_cases(layers, dac_model)):
    generator = torch.Generator().manual_seed(1000 + index)
    _randomise(module, generator)
    module.eval()
    x = torch.randn(shape, generator=generator)
    with torch.inference_mode():
      y = module(x)
      if name == "decoder":
        # DAC's decoder ends in Tanh; the release's (and ours) does not: keep both.
        arrays[f"{name}/output_tanh"] = y.numpy()
        y = nn.Sequential(*list(module.model)[:-1])(x)
    arrays[f"{name}/input"] = x.numpy()
    arrays[f"{name}/output"] = y.numpy()
    for key, value in _state_dict_numpy(module).items():
      arrays[f"{name}/state/{key}"] = value
    meta[name] = spec
  meta["torch_version"] = torch.__version__
  np.savez(out_path, meta=np.array(json.dumps(meta)), **arrays)


def run_checkpoint(pt_path, npz_path, encoder_dim=4, latent_dim=3, decoder_dim=32):
  """A small release-shaped SourceVAE: its g_ file, and its outputs on random inputs."""
  _, dac_model = load_dac()
  torch.manual_seed(1)
  model = ReleaseSourceVAE(dac_model, encoder_dim, (2, 4, 5, 8), latent_dim, decoder_dim,
                           (8, 5, 4, 2))
  generator = torch.Generator().manual_seed(7)
  _randomise(model, generator)
  model.eval()
  waveform = torch.randn((2, 1, 320 * 5), generator=generator)
  latents = torch.randn((2, latent_dim, 6), generator=generator)
  with torch.inference_mode():
    moments = model.encoder(waveform)
    decoded = model.decoder(latents)
  # The release's trainer: save_checkpoint(path, {'generator': generator.state_dict()}).
  torch.save({"generator": model.state_dict()}, pt_path)
  np.savez(npz_path, waveform=waveform.numpy(), moments=moments.numpy(),
           latents=latents.numpy(), decoded=decoded.numpy(),
           config=np.array(json.dumps(dict(
               encoder_width=encoder_dim, encoder_strides=[2, 4, 5, 8],
               latent_dim=latent_dim, decoder_width=decoder_dim,
               decoder_strides=[8, 5, 4, 2]))))


def run_decode(pt_path, npz_path, out_path):
  """The release-shaped SourceVAE of `pt_path` (config in `npz_path`'s "config"), decoding
  the latents [n, latent_dim, frames] in `npz_path`'s "latents": the PyTorch side of the
  imported-weights end-to-end test."""
  _, dac_model = load_dac()
  with np.load(npz_path) as data:
    config = json.loads(str(data["config"]))
    latents = torch.from_numpy(np.asarray(data["latents"], np.float32))
  model = ReleaseSourceVAE(dac_model, config["encoder_width"], config["encoder_strides"],
                           config["latent_dim"], config["decoder_width"],
                           config["decoder_strides"])
  model.load_state_dict(torch.load(pt_path, map_location="cpu")["generator"])
  model.eval()
  with torch.inference_mode():
    decoded = model.decoder(latents)
  np.savez(out_path, decoded=decoded.numpy())


def run_bench(part, batch, samples, threads, warmup, repeats):
  """Times the release-sized encoder or decoder; prints one JSON line on stdout."""
  torch.set_num_threads(threads)
  _, dac_model = load_dac()
  torch.manual_seed(0)
  model = ReleaseSourceVAE(dac_model, 64, (2, 4, 5, 8), 80, 1536, (8, 5, 4, 2))
  model.eval()
  with torch.inference_mode():
    if part == "encoder":
      module, x = model.encoder, torch.randn(batch, 1, samples)
    elif part == "decoder":
      # Decoder input: the frames that `samples` encodes to (327672 → 1024).
      frames = model.encoder(torch.zeros(1, 1, samples)).shape[-1]
      module, x = model.decoder, 0.5 * torch.randn(batch, 80, frames)
    else:
      raise ValueError(f"unknown part {part!r}")
    for _ in range(warmup):
      module(x)
    times, cpu_times = [], []
    for _ in range(repeats):
      start, cpu_start = time.perf_counter(), time.process_time()
      y = module(x)
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  print(json.dumps(dict(
      part=part, batch=batch, samples=samples, threads=torch.get_num_threads(),
      times=times, cpu_times=cpu_times, output_shape=list(y.shape),
      torch_version=torch.__version__,
      python=platform.python_version())))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  parity = commands.add_parser("parity")
  parity.add_argument("out")
  checkpoint = commands.add_parser("checkpoint")
  checkpoint.add_argument("pt")
  checkpoint.add_argument("npz")
  decode = commands.add_parser("decode")
  decode.add_argument("pt")
  decode.add_argument("npz")
  decode.add_argument("out")
  bench = commands.add_parser("bench")
  bench.add_argument("--part", choices=("encoder", "decoder"), required=True)
  bench.add_argument("--batch", type=int, default=1)
  bench.add_argument("--samples", type=int, default=327672)
  bench.add_argument("--threads", type=int, default=os.cpu_count())
  bench.add_argument("--warmup", type=int, default=1)
  bench.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  if args.command == "parity":
    run_parity(args.out)
  elif args.command == "checkpoint":
    run_checkpoint(args.pt, args.npz)
  elif args.command == "decode":
    run_decode(args.pt, args.npz, args.out)
  else:
    run_bench(args.part, args.batch, args.samples, args.threads, args.warmup, args.repeats)


if __name__ == "__main__":
  main()
