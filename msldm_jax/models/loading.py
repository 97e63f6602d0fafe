"""The one way to load what a stage made: `load_vae(path)`, `load_denoiser(path)`.

Each returns a `Loaded`: the module (built from the checkpoint's OWN model config, so a
checkpoint works under any run config), its variables ({'params': ...}, replicated over the
devices) and an identity, whose `params_sha256` names the parameters themselves.

`load_vae(path)` takes any of:
  - an imported SourceVAE: DIR/params (orbax) + DIR/model_config.json, as written by
    `python -m msldm_jax.tools.import_sourcevae`;
  - the VAE trainer's checkpoint folder (WORKDIR/vae/checkpoints) or its stage folder
    (WORKDIR/vae): the newest checkpoint's generator;
  - a workdir (WORKDIR/vae/checkpoints inside).
`load_denoiser(path)` takes any of:
  - an imported denoiser: DIR/params (orbax) + DIR/denoiser.json, as written by
    `python -m msldm_jax.tools.import_release` (the release's U-Net; its SourceVAE, when
    imported with it, in DIR/vae, which the identity's "latents" then names);
  - the diffusion trainer's checkpoint folder, its stage folder (WORKDIR/ldm) or a workdir.
Anything else is one error naming the path and what is there.

Only the inference subtree is restored (`checkpointing.restore_subtree`): no optimiser,
no discriminator is built or read.

Identity keys: checkpoint_dir (absolute path of the checkpoint folder or import), format
('vae_stage', 'imported' or 'ldm_stage'), step (None for an import), params_sha256; a
denoiser's also use_ema and, under "latents", the latent store and VAE it learned.
`check_same_vae` is the one test of "is this the VAE that made these latents?".
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from msldm_jax import checkpointing
from msldm_jax import config_loading
from msldm_jax import workdir_layout
from msldm_jax.models import denoisers
from msldm_jax.models import source_vae
from msldm_jax.parallel import mesh as mesh_lib

# Kinds of network a checkpoint's `model` record names (the denoisers': denoisers.KINDS).
VAE_KIND = "source_vae"

# An imported network's files: its parameters, and a SourceVAE's config or a denoiser's
# model record.
IMPORTED_PARAMS = "params"
IMPORTED_CONFIG = "model_config.json"
IMPORTED_DENOISER = "denoiser.json"
# Inside an imported denoiser's folder: the SourceVAE imported with it (its record names it
# by this relative path).
IMPORTED_VAE_DIR = "vae"

FORMAT_VAE_STAGE = "vae_stage"
FORMAT_IMPORTED = "imported"
FORMAT_LDM_STAGE = "ldm_stage"


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A trained network: `module.apply(params, ...)`, and where it came from."""
  module: nn.Module
  params: Any
  identity: dict[str, Any]


def params_sha256(params) -> str:
  """A content hash of a parameter tree: paths, dtypes, shapes and bytes of every leaf."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in leaves:
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


# -- Model records: what network a checkpoint holds ------------------------------------------


def vae_config_dict(model: source_vae.SourceVAE) -> dict[str, Any]:
  """A SourceVAE's constructor settings as plain JSON values."""
  return dict(encoder_width=model.encoder_width, encoder_strides=list(model.encoder_strides),
              decoder_width=model.decoder_width, decoder_strides=list(model.decoder_strides),
              decoder_min_width=model.decoder_min_width, latent_dim=model.latent_dim,
              dilations=list(model.dilations), dtype=model.dtype,
              per_source=model.per_source, num_stems=model.num_stems)


def vae_record(model: source_vae.SourceVAE) -> dict[str, Any]:
  """The `model` item of a VAE trainer's checkpoint."""
  return {"kind": VAE_KIND, "config": vae_config_dict(model)}


def denoiser_record(kind: str, model_config: Mapping[str, Any], **extra) -> dict[str, Any]:
  """The `model` item of a diffusion trainer's checkpoint (plus e.g. the latents it learned)."""
  return json.loads(json.dumps(denoisers.record(kind, model_config, **extra)))


def vae_from_config(values: Mapping[str, Any], source: str) -> source_vae.SourceVAE:
  """A SourceVAE from a recorded config; unknown keys are an error naming `source`."""
  return source_vae.SourceVAE.from_config(
      config_loading.update_known(source_vae.model_config("paper"), values, source,
                                  "SourceVAE"))


def denoiser_from_record(record: Mapping[str, Any], source: str) -> nn.Module:
  """The denoiser a model record describes; an unknown kind or key names `source`."""
  return denoisers.from_record(record.get("kind"), record["config"], source,
                               int(record.get("independent_stems", 0)))


# -- Imported networks (SourceVAE, denoiser) ------------------------------------------------


def _save_import(directory: str, variables, record_file: str, record: Mapping[str, Any]):
  """Writes DIR/params (orbax StandardCheckpointer) and DIR/<record_file> (JSON)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, IMPORTED_PARAMS), variables, force=True)
  with open(os.path.join(directory, record_file), "w") as f:
    json.dump(json.loads(json.dumps(dict(record))), f, indent=2)


def save_imported_vae(directory: str, variables, model: source_vae.SourceVAE):
  """Writes DIR/params and DIR/model_config.json (the SourceVAE's settings)."""
  _save_import(directory, variables, IMPORTED_CONFIG, vae_config_dict(model))


def save_imported_denoiser(directory: str, variables, record: Mapping[str, Any]):
  """Writes DIR/params and DIR/denoiser.json (`record`: the denoiser's kind and config, plus
  where it came from). The importer writes into a temporary folder and renames it, so that
  a failure leaves nothing."""
  _save_import(directory, variables, IMPORTED_DENOISER, record)


def latent_scale(denoiser: Loaded) -> tuple[float, ...]:
  """Per source, what the denoiser's training divided the VAE's latents by (its record's
  "latents"/"scale", `ldm.latent_scale`); () when it used them as stored (imports, and
  checkpoints from before the setting)."""
  return tuple(float(s) for s in denoiser.identity.get("latents", {}).get("scale") or ())


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _has_import(path: str, record_file: str) -> bool:
  """Whether PATH is an import: params/ and its record file."""
  return (os.path.isdir(os.path.join(path, IMPORTED_PARAMS)) and
          os.path.isfile(os.path.join(path, record_file)))


def _restore_import(path: str, abstract_params, replicated, what: str):
  """PATH/params restored to `abstract_params`' shapes, replicated; a mismatch names `what`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_params)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return checkpointer.restore(os.path.join(path, IMPORTED_PARAMS), abstract)
    except (ValueError, KeyError) as e:
      raise ValueError(f"{path}: the parameters in {IMPORTED_PARAMS}/ do not fit {what}: "
                       f"{e}") from e


def _load_imported_denoiser(path: str, replicated) -> Loaded:
  record_path = os.path.join(path, IMPORTED_DENOISER)
  record = _read_json(record_path)
  if "config" not in record:
    raise ValueError(f"{record_path}: no 'config' (the denoiser's settings) in it")
  model = denoiser_from_record(record, record_path)
  params = _restore_import(path, denoisers.abstract_params(model), replicated,
                           f"the {record['kind']} that {IMPORTED_DENOISER} describes")
  identity = {"checkpoint_dir": path, "format": FORMAT_IMPORTED, "step": None,
              "use_ema": False, "params_sha256": params_sha256(params),
              "imported_from": record.get("imported_from", {})}
  if "sigma_data" in record:
    identity["sigma_data"] = float(record["sigma_data"])
  vae = dict(record.get("latents", {}).get("vae") or {})
  if vae:
    # Recorded relative to the import, so that the folder can move.
    vae["checkpoint_dir"] = os.path.join(path, vae.get("checkpoint_dir", IMPORTED_VAE_DIR))
    identity["latents"] = {"vae": vae}
  return Loaded(model, params, identity)


def _load_imported_vae(path: str, replicated) -> Loaded:
  config_path = os.path.join(path, IMPORTED_CONFIG)
  values = _read_json(config_path)
  model = vae_from_config(values, config_path)
  params = _restore_import(path, source_vae.abstract_params(model), replicated,
                           f"the SourceVAE that {IMPORTED_CONFIG} describes ({values})")
  identity = {"checkpoint_dir": path, "format": FORMAT_IMPORTED, "step": None,
              "params_sha256": params_sha256(params)}
  return Loaded(model, params, identity)


# -- Trainer checkpoints ---------------------------------------------------------------------


def _describe(path: str) -> str:
  """What a folder holds, for an error message."""
  if not os.path.exists(path):
    return "nothing: the path does not exist"
  if not os.path.isdir(path):
    return "a file, not a folder"
  entries = sorted(os.listdir(path))
  if not entries:
    return "an empty folder"
  shown = ", ".join(entries[:12]) + (f", … ({len(entries)} entries)" if len(entries) > 12 else "")
  return f"{shown}"


def _find_checkpoints(path: str, stage: str) -> tuple[str, int] | None:
  """(checkpoint folder, newest step) for PATH given as the checkpoint folder itself, the
  trainer's folder, or a workdir; None when none of them holds a checkpoint."""
  for candidate in (path, os.path.join(path, workdir_layout.CHECKPOINTS),
                    workdir_layout.checkpoints_dir(path, stage)):
    step = checkpointing.latest_step(candidate)
    if step is not None:
      return candidate, step
  return None


def _read_record(directory: str, step: int, kinds: str | tuple[str, ...]) -> dict:
  try:
    record = checkpointing.read_model_record(directory, step)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise ValueError(f"{directory} step {step}: no model record in the checkpoint (was it "
                     f"written by an older version of msldm_jax?): {e}") from e
  kinds = (kinds,) if isinstance(kinds, str) else kinds
  if record.get("kind") not in kinds:
    raise ValueError(f"{directory} step {step} holds a {record.get('kind')!r} network, not "
                     f"{' or '.join(repr(k) for k in kinds)}: point at the other stage's "
                     "checkpoints")
  return record


def _restore_field(directory: str, step: int, field: str, abstract_params, replicated):
  """One field of a trainer's state (e.g. "ema_params"), replicated, and nothing else."""
  abstract = {field: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_params)}
  return checkpointing.restore_subtree(directory, step, abstract)[field]


def _replicated(mesh):
  return mesh_lib.replicated(mesh or mesh_lib.make_mesh())


def load_vae(path: str, *, mesh=None) -> Loaded:
  """The SourceVAE at PATH (an import, the VAE trainer's checkpoints, or a workdir).

  Raises:
    FileNotFoundError when PATH does not exist; ValueError when it holds neither kind of
    checkpoint, naming PATH and what was found there.
  """
  if not path:
    raise ValueError("load_vae: empty path (set config.ldm.vae_checkpoint, or pass a workdir)")
  path = os.path.abspath(path)
  replicated = _replicated(mesh)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no SourceVAE at {path}: the path does not exist (run "
                            "--mode=train_vae, or import published weights with "
                            "python -m msldm_jax.tools.import_sourcevae)")
  if _has_import(path, IMPORTED_CONFIG):
    return _load_imported_vae(path, replicated)
  found = _find_checkpoints(path, workdir_layout.VAE)
  if found is None:
    raise ValueError(
        f"no SourceVAE at {path}: it is neither an imported SourceVAE ({IMPORTED_PARAMS}/ and "
        f"{IMPORTED_CONFIG}), nor a VAE checkpoint folder (numbered steps from "
        f"--mode=train_vae), nor a workdir with {workdir_layout.VAE}/"
        f"{workdir_layout.CHECKPOINTS}/; found there: {_describe(path)}")
  directory, step = found
  record = _read_record(directory, step, VAE_KIND)
  model = vae_from_config(record["config"], f"{directory} step {step}")
  params = _restore_field(directory, step, "generator", source_vae.abstract_params(model),
                          replicated)
  identity = {"checkpoint_dir": directory, "format": FORMAT_VAE_STAGE, "step": int(step),
              "params_sha256": params_sha256(params)}
  return Loaded(model, params, identity)


def load_denoiser(path: str, *, use_ema: bool = True, mesh=None,
                  step: int | None = None) -> Loaded:
  """The diffusion network at PATH (an import, the trainer's checkpoints, its folder, or a
  workdir): its newest checkpoint, or the one at `step` (e.g. to follow a run's progress).

  The identity's "latents" holds what the run learned: latents_dir, shape, and "vae" (the
  identity of the VAE that encoded them: decode its samples with that VAE only). An import
  has no "latents" (nothing records which VAE's latents it learned) and no EMA: use_ema is
  ignored for it.
  """
  if not path:
    raise ValueError("load_denoiser: empty path")
  path = os.path.abspath(path)
  if _has_import(path, IMPORTED_DENOISER):
    if step is not None:
      raise ValueError(f"{path} holds an imported network, not a trainer's checkpoints: "
                       f"there is no step {step} to choose")
    return _load_imported_denoiser(path, _replicated(mesh))
  found = _find_checkpoints(path, workdir_layout.LDM)
  if found is None:
    raise FileNotFoundError(
        f"no diffusion model checkpoint at {path} (nor in {workdir_layout.CHECKPOINTS}/ or "
        f"{workdir_layout.LDM}/{workdir_layout.CHECKPOINTS}/ below it): run --mode=train_ldm "
        f"first; found there: {_describe(path)}")
  directory, latest = found
  if step is None:
    step = latest
  elif step not in (saved := checkpointing.saved_steps(directory)):
    raise ValueError(f"{directory}: no complete checkpoint at step {step}; saved steps: "
                     f"{', '.join(map(str, saved))}")
  record = _read_record(directory, step, denoisers.KINDS)
  model = denoiser_from_record(record, f"{directory} step {step}")
  field = "ema_params" if use_ema else "params"
  replicated = _replicated(mesh)
  params = _restore_field(directory, step, field, denoisers.abstract_params(model), replicated)
  identity = {"checkpoint_dir": directory, "format": FORMAT_LDM_STAGE, "step": int(step),
              "use_ema": bool(use_ema), "params_sha256": params_sha256(params)}
  if "latents" in record:
    identity["latents"] = record["latents"]
  return Loaded(model, params, identity)


def check_same_vae(vae: Loaded, expected: Mapping[str, Any] | None, *, what: str):
  """Raises unless `vae` has the parameters `expected` (a recorded VAE identity) names.

  Args:
    vae: the loaded VAE.
    expected: the identity recorded with `what` (a latent store's manifest, a diffusion
      checkpoint); None or without params_sha256 means nothing was recorded.
    what: what recorded it, for the message (e.g. "the latent store at runs/x/latents").
  """
  if not expected or not expected.get("params_sha256"):
    raise ValueError(f"{what} records no VAE identity, so nothing says which VAE made its "
                     f"latents (loaded: {vae.identity['checkpoint_dir']})")
  if vae.identity["params_sha256"] != expected["params_sha256"]:
    raise ValueError(
        f"the VAE {vae.identity['checkpoint_dir']} (step {vae.identity.get('step')}, params "
        f"sha256 {vae.identity['params_sha256']}) is not the one recorded by {what}: "
        f"{expected.get('checkpoint_dir')} (step {expected.get('step')}, params sha256 "
        f"{expected['params_sha256']}): latents of two VAEs must not mix, nor be decoded by "
        "another VAE; point config.ldm.vae_checkpoint at that VAE")
