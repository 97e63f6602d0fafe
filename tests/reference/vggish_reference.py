"""Writes a VGGish state dict in the PyTorch port's format and that port's outputs.

Run by tests/test_vggish.py in the reference interpreter (torch). The model is a width-
configurable copy of harritaylor/torchvggish's `VGG` (`make_layers`, `forward` with its two
transposes before flattening) and `Postprocessor.postprocess`, with random weights.

  python vggish_reference.py WIDTHS_JSON EXAMPLES_NPY OUT_DIR
writes OUT_DIR/vggish.pth (state dict), OUT_DIR/pca.pth ({'pca_eigen_vectors', 'pca_means'})
and OUT_DIR/outputs.npz (embeddings, postprocessed).
"""

import json
import os
import sys

import numpy as np
import torch
from torch import nn


def make_layers(conv_channels):
  layers, in_channels = [], 1
  plan = [conv_channels[0], "M", conv_channels[1], "M", conv_channels[2], conv_channels[3],
          "M", conv_channels[4], conv_channels[5], "M"]
  for v in plan:
    if v == "M":
      layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
      layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      in_channels = v
  return nn.Sequential(*layers)


class VGG(nn.Module):

  def __init__(self, conv_channels, fc_features):
    super().__init__()
    self.features = make_layers(conv_channels)
    self.embeddings = nn.Sequential(
        nn.Linear(conv_channels[-1] * 4 * 6, fc_features[0]), nn.ReLU(True),
        nn.Linear(fc_features[0], fc_features[1]), nn.ReLU(True),
        nn.Linear(fc_features[1], fc_features[2]), nn.ReLU(True))

  def forward(self, x):
    x = self.features(x)
    x = torch.transpose(x, 1, 3)
    x = torch.transpose(x, 1, 2)
    x = x.contiguous()
    x = x.view(x.size(0), -1)
    return self.embeddings(x)


def postprocess(embeddings, pca_matrix, pca_means):
  applied = torch.mm(pca_matrix, (embeddings.T - pca_means)).T
  clipped = torch.clamp(applied, -2.0, 2.0)
  return torch.round((clipped + 2.0) * (255.0 / 4.0))


def main(widths_json, examples_npy, out_dir):
  widths = json.loads(widths_json)
  torch.manual_seed(0)
  model = VGG(widths["conv_channels"], widths["fc_features"]).eval()
  # Larger biases than the default init, so that ReLUs are neither all on nor all off.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.05)
  torch.save(model.state_dict(), os.path.join(out_dir, "vggish.pth"))
  size = widths["fc_features"][-1]
  pca_matrix = torch.randn(size, size) / size ** 0.5
  pca_means = torch.randn(size) * 0.01
  torch.save({"pca_eigen_vectors": pca_matrix, "pca_means": pca_means},
             os.path.join(out_dir, "pca.pth"))
  examples = torch.from_numpy(np.load(examples_npy)).float()[:, None]  # [n, 1, 96, 64].
  with torch.no_grad():
    embeddings = model(examples)
    post = postprocess(embeddings, pca_matrix, pca_means.reshape(-1, 1))
  np.savez(os.path.join(out_dir, "outputs.npz"), embeddings=embeddings.numpy(),
           postprocessed=post.numpy(), pre_round=((torch.clamp(torch.mm(
               pca_matrix, (embeddings.T - pca_means.reshape(-1, 1))).T, -2.0, 2.0) + 2.0)
               * (255.0 / 4.0)).numpy())


if __name__ == "__main__":
  main(*sys.argv[1:])
