"""The study (`--mode=study`, configs/study.py): its tiny variant end to end, from the command
line, on the tests' mini dataset; the baselines' products; the runner's resume logic (a
second run redoes nothing, a scoring setting redoes only the scoring) on stand-in stages."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from msldm_jax import config_loading
from msldm_jax import provenance
from msldm_jax.diffusion import samplers
from msldm_jax.evaluation import latent_dependence
from msldm_jax.evaluation import vae_quality
from msldm_jax.latents import store
from msldm_jax.study import control
from msldm_jax.study import runner
from msldm_jax.training import loop


def _command(repo_root, workdir, mini_dataset, report_dir):
  return [sys.executable, "-m", "msldm_jax.main", "--config=configs/study.py:variant=tiny",
          f"--workdir={workdir}", "--mode=study", f"--config.study.report_dir={report_dir}",
          *mini_dataset.config_flags()]


def _assert_an_evaluation_writes_every_table(out: pathlib.Path):
  """What `--mode=evaluate` leaves in a system's evaluation/ folder (2 pieces, the statistics
  embedding, 2 partial chunks): every table, KAD with its interval and floor, FD refused,
  the music measures, the cross-stem measures of pieces, reconstructions and the denoiser,
  and the 14 partial-generation rows."""
  metrics = json.loads((out / "metrics.json").read_text())
  for name in ("total_generation.md", "total_generation.csv", "total_generation.png",
               "music_measures.md", "levels.md", "instrument_tags.md",
               "vae_reconstruction.md", "metrics.json"):
    assert (out / name).is_file(), name
  assert metrics["num_generated"] == 2
  assert metrics["embedding"] == "stats-logmel-mfcc-chroma"
  assert set(metrics["total_generation"]) == {"mixture", "bass", "drums", "guitar", "piano"}
  for row in metrics["total_generation"].values():
    kad, fd = row[""]["KAD ×100"], row[""]["FD"]
    # Every KAD has its interval and floor; FD of 2 one-window pieces is refused (2 < 192).
    assert np.isfinite([kad["value"], kad["low"], kad["high"], kad["floor"]]).all()
    # And the codec's ceiling: the reference's first half through the VAE.
    assert np.isfinite([kad["through_vae"], kad["through_vae_low"],
                        kad["through_vae_high"]]).all()
    assert kad["generated_windows"] == 2 and kad["reference_windows"] == metrics[
        "num_reference"]
    assert fd["value"] is None and "refused" in fd["note"]
  markdown = (out / "total_generation.md").read_text()
  assert "Embedding: stats-logmel-mfcc-chroma" in markdown and "floor" in markdown
  assert "KAD ×100 through the VAE" in markdown
  assert 1 <= metrics["num_reference"] <= metrics["reference_split_chunks"]
  for side in ("generated", "real"):
    rates = metrics["music_measures"][side]
    assert 0.0 <= rates["empty stem rate (all)"] <= 1.0
    # Each cross-stem measure on stems of other pieces too, and the difference with its
    # interval (2 generated pieces: each pairs with the other).
    for name, scores in metrics["cross_stem_dependence"][side].items():
      np.testing.assert_equal(rates[f"{name}, dependence (own − other pieces)"],
                              scores["dependence"])
      np.testing.assert_allclose(scores["dependence"],
                                 scores["same pieces"] - scores["other pieces"], equal_nan=True)
  assert (out / "cross_stem_dependence.md").is_file()
  # The real chunks through the VAE too: the dependence a generator can reach through it.
  reconstructed = metrics["cross_stem_dependence"]["reconstructed"]
  assert set(reconstructed) == set(metrics["cross_stem_dependence"]["real"])
  for scores in reconstructed.values():
    np.testing.assert_allclose(scores["dependence"],
                               scores["same pieces"] - scores["other pieces"], equal_nan=True)
  assert "(reconstructed)" in (out / "cross_stem_dependence.md").read_text()
  # The same question asked of the denoiser in latents: a row per stem and σ, and all stems.
  information = metrics["cross_stem_information"]
  assert len(information) == 5 * len(latent_dependence.SIGMAS)
  for row in information.values():
    assert np.isfinite([row["own"], row["swapped"], row["low"], row["high"]]).all()
    np.testing.assert_allclose(row["information"], row["swapped"] - row["own"], rtol=1e-6,
                               atol=1e-9)
  assert "| piano at σ=" in (out / "cross_stem_information.md").read_text()
  assert set(metrics["levels"]) == {"bass", "drums", "guitar", "piano"}
  # Chunks shorter than the tagger's 3 s patch: nothing to tag, said so, not a crash.
  assert metrics["instrument_tags"]["real"]["piano"]["stems"] == 0
  # The 14 partial-generation rows, each scored as a mixture and as the generated stems.
  partial = metrics["partial_generation"]
  assert len(partial) == 14 and metrics["partial"]["partial_chunks"] == 2
  assert set(partial["bass+drums"]) == {"mixture", "generated stems"}
  assert all(np.isfinite(column["KAD ×100"]["value"])
             for row in partial.values() for column in row.values())
  assert "conditioning ones included" in (out / "partial_generation.md").read_text()
  assert (out / "partial_generation.md").read_text().count("| bass") == 7  # rows with bass first
  piece = out / "partial" / "drums+guitar+piano"
  assert (piece / "mix.wav").is_file() and (piece / "piece.json").is_file()
  assert json.loads((piece / "piece.json").read_text())["given"] == ["bass"]


# The longest test of the suite (minutes on 2 CPU cores: every stage of three systems).
@pytest.mark.slow(minutes=6)
def test_tiny_study_runs_end_to_end(repo_root, tmp_path, mini_dataset):
  workdir, report_dir = tmp_path / "study", tmp_path / "report"
  mini_dataset.copy_rendering_to(workdir)
  command = _command(repo_root, workdir, mini_dataset, report_dir)
  result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=2700)
  assert result.returncode == 0, result.stderr[-4000:]

  # MixLDM: its VAE trained on mixture windows, its latents one source, its pieces mixtures.
  mixldm = runner.system_dir(str(workdir), "mixldm")
  vae_records = loop.read_metrics(os.path.join(mixldm, "vae"))
  assert any("eval/mel_distance/mix" in r for r in vae_records)
  assert not any("eval/mel_distance/bass" in r for r in vae_records)
  manifest = store.load_manifest(os.path.join(mixldm, "latents"))
  assert manifest["settings"]["stems"] == ["mix"] and manifest["shape"][0] == 1
  joint = store.load_manifest(os.path.join(workdir, "latents"))
  assert joint["shape"][0] == 4 and joint["shape"][1:] == manifest["shape"][1:]
  piece = os.path.join(mixldm, "samples", "piece_000")
  assert os.path.exists(os.path.join(piece, "mix.wav"))
  assert not os.path.exists(os.path.join(piece, "stems"))
  with open(os.path.join(mixldm, "evaluation", "metrics.json")) as f:
    mix_metrics = json.load(f)
  assert mix_metrics["sources"] == ["mix"] and list(mix_metrics["total_generation"]) == [
      "mixture"]
  assert mix_metrics["vae_reconstruction"]["mix"]["si_sdr"] is not None

  # Both VAEs scored on the test split before any latent model: the stems' and the mixture's.
  for folder, sources in ((str(workdir), ["bass", "drums", "guitar", "piano"]),
                          (mixldm, ["mix"])):
    with open(os.path.join(vae_quality.output_dir(folder), "metrics.json")) as f:
      vae_scores = json.load(f)
    assert vae_scores["split"] == "test" and vae_scores["sources"] == sources
    assert list(vae_scores["reconstruction"]) == sources
    assert all(np.isfinite(float(row["mel_distance"]))
               for row in vae_scores["reconstruction"].values())

  # Every table of the evaluation stage, on msldm's pieces (the tiny study is the tests'
  # run of every stage on real music; `--mode=all`'s own logic is tests/test_main.py's).
  _assert_an_evaluation_writes_every_table(
      pathlib.Path(runner.system_dir(str(workdir), "msldm")) / "evaluation")

  # ISLDM and MSLDM share the joint latents; each system has scored pieces.
  information = {}
  for name in ("msldm", "isldm"):
    with open(os.path.join(runner.system_dir(str(workdir), name), "evaluation",
                           "metrics.json")) as f:
      metrics = json.load(f)
    assert set(metrics["total_generation"]) == {"mixture", "bass", "drums", "guitar", "piano"}
    assert len(metrics["partial_generation"]) == 14
    information[name] = np.array([row["information"] for row in
                                  metrics["cross_stem_information"].values()])
  # isldm's networks never see the other stems: its losses (~1) do not move when they
  # change, up to float32 round-off; msldm's one network reads them all (after 6 steps its
  # output layer is still near its zero start: ~1e-5).
  np.testing.assert_allclose(information["isldm"], 0.0, atol=1e-6)
  assert np.abs(information["msldm"]).max() > 2e-6
  # The sampler runs: each at its sampler and step count, scored on the mixture alone.
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py:variant=tiny"))
  for sampler, evaluations in runner.sampler_runs(config):
    folder = runner.sampler_dir(str(workdir), sampler, evaluations)
    with open(os.path.join(folder, "samples", "piece_000", "piece.json")) as f:
      settings = json.load(f)["sampler"]
    assert settings["name"] == sampler
    assert settings["num_steps"] == samplers.steps_for_evaluations(sampler, evaluations)
    with open(os.path.join(folder, "evaluation", "metrics.json")) as f:
      assert list(json.load(f)["total_generation"]) == ["mixture"]

  # The control ran first: msldm and isldm (the systems with stems) on the planted latents.
  with open(os.path.join(control.control_dir(str(workdir)), control.RESULTS_FILE)) as f:
    assert list(json.load(f)["rows"]) == [control.DATA_ROW, "msldm", "isldm"]
  records = [json.loads(line) for line in
             (workdir / "study" / runner.STEPS_LOG).read_text().splitlines()]
  assert records[0]["step"] == "control"
  # Each step names the commit it ran from (the package's checkout: this repository).
  commits = {record["commit"] for record in records}
  assert len(commits) == 1 and commits != {"unknown"}, commits

  # The report: every section, its plots, a spectrogram per system.
  with open(report_dir / "README.md") as f:
    report = f.read()
  assert "Against the goals" in report and "| SourceVAE (stems) | guitar |" in report
  kad_mixture = next(line for line in report.splitlines()
                     if line.startswith("| KAD ×100 mixture |"))
  assert kad_mixture.count("through the VAE") == 3, kad_mixture  # msldm, isldm, mixldm
  shares = [line for line in report.splitlines()
            if line.startswith("- ") and "above what its codec allows" in line]
  assert [line.split(":")[0] for line in shares] == ["- msldm", "- isldm", "- mixldm"], shares
  steps_run = {record["step"] for record in records}
  assert f"the steps' commits: {commits.pop()} ({len(steps_run)} steps)" in report
  # Each VAE's level change beside SI-SDR and mel distance, and every generated level beside
  # the real stems' through the VAE and as they are.
  vae_row = next(line for line in report.splitlines()
                 if line.startswith("| SourceVAE (stems) | bass |"))
  assert vae_row.split(" | ")[5][0] in "+-", vae_row
  levels_row = next(line for line in report.splitlines()
                    if line.startswith("| level bass dB, generated (real through the VAE / "))
  assert levels_row.count(" / ") == 1 + 2, levels_row  # msldm's and isldm's cells
  for heading in ("## The SourceVAEs", "## The latent models, for the same training time",
                  "## Total generation", "## Partial generation",
                  "## Samplers against network evaluations (msldm)",
                  "## The control: a dependence planted in the latents",
                  "## Where the time went"):
    assert heading in report
  for name in ("msldm", "isldm", "mixldm"):
    assert f"| {name} |" in report
    assert (report_dir / f"spectrogram_{name}.png").exists()
  for plot in ("loss_by_sigma.png", "samplers.png", control.PLOT_FILE):
    assert (report_dir / plot).exists()
  # Each system with stems: its cross-stem dependence beside the real stems'.
  table = report[report.index("| measure | real | real through the VAE | msldm | isldm |"):]
  assert "| harmonic chroma agreement |" in table and "| drum-bass onset F-measure |" in table
  onsets_row = next(line for line in table.splitlines()
                    if line.startswith("| drum-bass onset F-measure |"))
  assert onsets_row.split(" | ")[2][0] in "+-", onsets_row  # the reconstructions' cell
  # And the denoisers' cross-stem information in latents, one row per σ.
  table = report[report.index("| noise level | msldm | isldm |"):]
  # (After 6 steps msldm's value is ~1e-5 of either sign: the cell's form, not its sign.)
  row = table.splitlines()[2]
  assert re.match(r"\| σ=0\.0161 \| [+-]\d\.\d{4} \[[+-]\d", row), row

  # The same from the samples, as a finished study's user recomputes it.
  recomputed = subprocess.run(
      [sys.executable, "-m", "benchmarks.cross_stem_dependence",
       "--config=configs/study.py:variant=tiny", f"--workdir={workdir}",
       *mini_dataset.config_flags()], cwd=repo_root, capture_output=True, text=True,
      timeout=600)
  assert recomputed.returncode == 0, recomputed.stderr[-4000:]
  with open(os.path.join(runner.system_dir(str(workdir), "isldm"), "evaluation",
                         "metrics.json")) as f:
    scores = json.load(f)["cross_stem_dependence"]["generated"]["drum-bass onset F-measure"]
  lines = recomputed.stdout.splitlines()
  header = next(line for line in lines if line.startswith("| measure |")).split(" | ")
  assert header[2] == "real through the VAE", header
  isldm_column = next(i for i, name in enumerate(header) if name.startswith("isldm"))
  row = next(line for line in lines if line.startswith("| drum-bass onset F-measure |"))
  assert row.split(" | ")[isldm_column].startswith(f"{float(scores['dependence']):+.3f} [")

  # The denoisers' cross-stem information over their kept checkpoints, as a user follows
  # a run (here the one at step 3 of the two kept): isldm's 0 at every σ, and a plot.
  plot = tmp_path / "information.png"
  followed = subprocess.run(
      [sys.executable, "-m", "benchmarks.cross_stem_information", "--every_checkpoint",
       "--steps=3", f"--plot={plot}", "--splits=test", "--denoisers=" + ",".join(
           runner.system_dir(str(workdir), name) for name in ("isldm", "msldm"))],
      cwd=repo_root, capture_output=True, text=True, timeout=600)
  assert followed.returncode == 0, followed.stderr[-4000:]
  assert plot.exists()
  isldm_rows = [line for line in followed.stdout.splitlines()
                if line.startswith(f"| {runner.system_dir(str(workdir), 'isldm')} |")]
  assert len(isldm_rows) == 1, followed.stdout  # of the checkpoints at steps 3 and 6
  assert all(cell.strip().startswith(("+0.000 [", "-0.000 ["))
             for row in isldm_rows for cell in row.split(" | ")[3:-1]), isldm_rows

  # The VAE's score as a user asks for it, on another split.
  scored = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/study.py:variant=tiny",
       f"--workdir={workdir}", "--mode=evaluate_vae", "--config.evaluate.vae_split=validation",
       *mini_dataset.config_flags()], cwd=repo_root, capture_output=True, text=True,
      timeout=600)
  assert scored.returncode == 0, scored.stderr[-4000:]
  with open(os.path.join(vae_quality.output_dir(str(workdir)), "metrics.json")) as f:
    assert json.load(f)["split"] == "validation"
  assert (pathlib.Path(vae_quality.output_dir(str(workdir))) / "spectrogram.png").exists()


def test_a_step_digests_only_what_its_stage_reads(repo_root):
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py:variant=tiny"))
  before = {mode: runner.step_digest(config, mode) for mode in runner.UNREAD_SECTIONS}
  config.evaluate.bootstrap_samples += 1
  after = {mode: runner.step_digest(config, mode) for mode in runner.UNREAD_SECTIONS}
  assert [m for m in before if before[m] != after[m]] == ["evaluate_vae", "evaluate"]
  # The control samples with the study's sampler.
  config.sample.num_steps += 1
  changed = [m for m in after if runner.step_digest(config, m) != after[m]]
  assert changed == ["sample", "evaluate", "control"]
  # Of the study's own keys the control's step digests those it reads.
  control_step = runner.step_digest(runner.control_step_config(config), "control")
  config.study.notes = "a remark"
  config.study.samplers = "heun"
  assert runner.step_digest(runner.control_step_config(config), "control") == control_step
  config.study.control_segments += 1
  assert runner.step_digest(runner.control_step_config(config), "control") != control_step
  config.vae.optimizer.learning_rate *= 2
  assert all(runner.step_digest(config, m) != before[m] for m in before)


def test_study_settings_are_checked(repo_root):
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py:variant=tiny"))
  config.study.systems = "msldm,mixlm"
  with pytest.raises(ValueError, match="unknown.*mixlm"):
    runner.study_systems(config)
  config.study.samplers = "euler_churn,rk4"
  with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
    runner.sampler_runs(config)
  config.study.samplers, config.study.evaluations = "heun", "10,x"
  with pytest.raises(ValueError, match="'x' is not a positive count"):
    runner.sampler_runs(config)


def test_the_unet_system_is_msldm_with_the_releases_network_on_the_shared_latents(repo_root):
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  assert runner.study_systems(config) == ["msldm", "isldm", "mixldm", "msldm_unet",
                                          "msldm_coupled"]
  dit = runner.system_config(config, "/w", "msldm")
  unet = runner.system_config(config, "/w", "msldm_unet")
  assert (unet.system, unet.ldm.denoiser, dit.ldm.denoiser) == ("msldm", "unet", "dit")
  # Everything else as msldm's: the same latents and VAE, scale, budget and sampling.
  for config_ in (dit, unet):
    del config_.ldm["denoiser"]
  assert unet.to_dict() == dit.to_dict()
  assert unet.ldm.latents_dir == "/w/latents"
  assert unet.ldm.train.max_seconds == config.study.ldm_seconds == 1200.0
  assert runner.system_dir("/w", "msldm_unet") == "/w/systems/msldm_unet"


def test_the_coupled_system_is_msldm_with_one_stream_per_stem(repo_root):
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  dit = runner.system_config(config, "/w", "msldm")
  coupled = runner.system_config(config, "/w", "msldm_coupled")
  assert (coupled.system, coupled.ldm.denoiser) == ("msldm", "dit")
  assert (coupled.ldm.model.stem_streams, dit.ldm.model.stem_streams) == (4, 0)
  # Everything else as msldm's: the same latents, VAE, network sizes, budget and sampling.
  coupled.ldm.model.stem_streams = 0
  assert coupled.to_dict() == dit.to_dict()


def test_the_commit_ignores_the_reports_own_files_and_names_the_packages_checkout(
    tmp_path, monkeypatch):
  def git(*args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                   check=True, capture_output=True)
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "README.md").write_text("old report")
  (tmp_path / "code").mkdir()
  (tmp_path / "code" / "x.py").write_text("x = 1")
  git("init", "-q")
  git("add", ".")
  git("commit", "-q", "-m", "first")
  # From a folder of the checkout, whatever the working directory.
  monkeypatch.chdir("/")
  repo = str(tmp_path / "code")
  head = provenance.commit(repo_dir=repo)
  assert len(head) >= 7 and "uncommitted" not in head
  (tmp_path / "docs" / "README.md").write_text("the report rewritten")
  assert provenance.commit(str(tmp_path / "docs"), repo_dir=repo) == head
  assert provenance.commit(repo_dir=repo) == f"{head} with uncommitted changes"
  (tmp_path / "code" / "x.py").write_text("x = 2")
  assert provenance.commit(str(tmp_path / "docs"), repo_dir=repo) == (
      f"{head} with uncommitted changes")
  assert provenance.commit("/elsewhere/report", repo_dir=repo) == (
      f"{head} with uncommitted changes")
  assert provenance.commit(repo_dir=str(tmp_path.parent)) == "unknown"


def test_the_report_names_the_commits_its_steps_ran_from():
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  steps = {"a": {"commit": "abc1234"}, "b": {"commit": "abc1234"}, "c": {"commit": "def5678"},
           "d": {}}
  assert report.step_commits(steps) == (
      "the steps' commits: abc1234 (2 steps), def5678 (1 step), not recorded (1 step)")
  assert report.step_commits({}) == "no steps recorded"


def test_every_sampler_run_keeps_the_studys_noise_schedule(repo_root):
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  for sampler, evaluations in runner.sampler_runs(config):
    sample = runner.sampler_run_config(config, "/w", sampler, evaluations).sample
    assert (sample.sampler, sample.sigma_max, sample.sigma_min) == (sampler, 10.0, 0.01)
    # The rest at the sampler's own defaults: heun and dpmpp_2m without the release's churn.
    defaults = samplers.sampler_config(sampler)
    for key in set(defaults) - {"num_steps", *runner.SCHEDULE_KEYS}:
      assert sample[key] == defaults[key], (sampler, key)
    assert sample.num_steps == samplers.steps_for_evaluations(sampler, evaluations)


def test_heun_steps_stay_within_the_evaluations():
  for evaluations in (1, 2, 9, 10, 25, 150):
    steps = samplers.steps_for_evaluations("heun", evaluations)
    assert samplers.network_evaluations("heun", steps) <= evaluations
    assert samplers.network_evaluations("heun", steps + 1) > evaluations
    assert samplers.steps_for_evaluations("dpmpp_2m", evaluations) == evaluations
  assert np.isclose(samplers.network_evaluations("euler_churn", 150), 150)


def test_a_mixture_system_has_no_stems_to_give_or_generate(repo_root):
  from msldm_jax.generation import stage as generation_stage  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py:variant=tiny"))
  config.system = "mixldm"
  assert generation_stage.prepare_task(config).generate_stems == ("mix",)
  config.sample.generate = "bass"
  with pytest.raises(ValueError, match="mixture alone.*generate='bass'"):
    generation_stage.prepare_task(config)


def test_notes_split_at_semicolons_outside_parentheses():
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  assert report.split_notes("a (the same; but later); b;; c ") == [
      "a (the same; but later)", "b", "c"]
  assert report.split_notes("") == []


def test_the_report_holds_every_joint_system_to_the_papers_ordering(repo_root):
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  def result(value, low, high):
    score = {"value": value, "low": low, "high": high}
    return {"metrics": {"total_generation": {"mixture": {"": {report.KAD: score}}}}}
  results = {"msldm": result(85.0, 82.0, 88.0), "isldm": result(68.0, 65.0, 71.0),
             "mixldm": result(90.0, 86.0, 94.0), "msldm_coupled": result(64.0, 62.0, 67.5),
             "msldm_unet": result(70.0, 60.0, 80.0)}
  assert report.joint_systems(results) == ["msldm", "msldm_coupled", "msldm_unet"]
  lines = report._ordering(results)  # pylint: disable=protected-access
  assert len(lines) == 6
  assert ("- mixture KAD ×100, msldm 85.00 against isldm 68.00: isldm ahead, intervals "
          "apart: the paper's ordering is not reproduced.") in lines
  assert ("- mixture KAD ×100, msldm_coupled 64.00 against mixldm 90.00: msldm_coupled "
          "ahead, intervals apart: shown.") in lines
  assert ("- mixture KAD ×100, msldm_coupled 64.00 against isldm 68.00: msldm_coupled lower, "
          "but the intervals overlap: not shown.") in lines
  assert ("- mixture KAD ×100, msldm_unet 70.00 against isldm 68.00: isldm lower, the "
          "intervals overlap: not shown either way.") in lines


def test_the_report_states_what_msldms_variants_are(repo_root):
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  lines = report._variant_departures(config)  # pylint: disable=protected-access
  assert [line.split(":")[0].split(" (")[0] for line in lines] == [
      "- msldm_unet", "- msldm_coupled"]
  assert "32 channels" in lines[0] and "hidden width 64" in lines[1]
  config.study.systems = "msldm,isldm"
  assert report._variant_departures(config) == []  # pylint: disable=protected-access


def test_the_report_states_a_noise_range_other_than_the_releases(repo_root):
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  noise = lambda: [line for line in report._departures(config)  # noqa: E731  # pylint: disable=protected-access
                   if line.startswith("- Noise:")]
  assert (config.ldm.sigma_max_train, config.sample.sigma_max) == (10.0, 10.0)
  assert noise()[0].startswith("- Noise: training σ ~ U(0, 10] and every sampler starting "
                               "from σ 10 (the release's: U(0, 3] and 3).")
  config.ldm.sigma_distribution = "lognormal"
  assert noise()[0].startswith("- Noise: training ln σ ~ N(-1.2, 1.2²) and")
  config.ldm.sigma_distribution = "uniform"
  config.ldm.sigma_max_train, config.sample.sigma_max = 3.0, 3.0
  assert noise() == []


def test_the_report_names_the_vae_loss_terms_the_paper_does_not_have(repo_root):
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  loss = lambda: next(line for line in report._departures(config)  # noqa: E731  # pylint: disable=protected-access
                      if line.startswith("- Its loss:"))
  assert "300·waveform L1 (the paper's" in loss() and "·mel magnitude" not in loss()
  config.vae.loss_weights.mel_magnitude = 30.0
  assert "300·waveform L1 + 30·mel magnitude L1 (the paper's" in loss()
  config.vae.loss_weights_by_stem = dict(drums=dict(mel_magnitude=300.0))
  assert "no waveform or mel magnitude term); for drums: mel_magnitude 300; " in loss()


def test_the_mixture_vae_gets_a_stems_share_of_the_time_and_of_the_reconstruction_steps(
    repo_root):
  """The stems' VAEs train in turn, so each gets a quarter of the steps before the GAN phase
  and of the time; the mixture VAE, one VAE, gets that quarter of both. The report says so."""
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  mixture = runner.system_config(config, "/w", "mixldm")
  assert config.vae.adversarial_start == 2960 and mixture.vae.adversarial_start == 740
  assert mixture.vae.train.max_seconds == config.vae.train.max_seconds / 4
  assert not mixture.vae.model.per_source
  # The other systems read the stems' VAE as it is: their config keeps its recipe.
  assert runner.system_config(config, "/w", "isldm").vae.adversarial_start == 2960
  loss = lambda: next(line for line in report._departures(config)  # noqa: E731  # pylint: disable=protected-access
                      if line.startswith("- Its loss:"))
  assert loss().endswith("the first 2960 steps reconstruction-only (no discriminator), then "
                         "GAN steps with the 'tiny' discriminators; the mixture VAE's first "
                         "740 steps."), loss()
  config.vae.model.per_source = False  # one VAE for all stems: the same start for both
  assert runner.mixture_vae_adversarial_start(config) == 2960
  assert loss().endswith("then GAN steps with the 'tiny' discriminators."), loss()
  config.vae.adversarial_start = config.vae.train.num_steps
  assert loss().endswith("reconstruction-only throughout (no discriminator)."), loss()


def test_the_vae_section_counts_the_gan_steps_and_marks_where_they_began(tmp_path,
                                                                        monkeypatch):
  from msldm_jax import plotting  # pylint: disable=g-import-not-at-top
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  def records(last_step):  # a log record every 10 steps at 2 s a step, a validation every 20
    return [{"step": step, "budget_seconds": 2.0 * step, "loss/mel": 1.0, "loss/kl": 0.5,
             **({"eval/mel_distance": 3.0 - step / 100, "eval/si_sdr": -20.0 + step / 10}
                if step % 20 == 0 else {})} for step in range(10, last_step + 1, 10)]
  drawn = {}
  monkeypatch.setattr(plotting, "save_curves",
                      lambda path, curves, **kwargs: drawn.setdefault(
                          os.path.basename(path), kwargs.get("marks")))
  lines = report._vae_section(  # pylint: disable=protected-access
      {"stems": records(100), "mixture": records(40)}, {"stems": 60, "mixture": 60},
      {"stems": None, "mixture": None}, str(tmp_path))
  assert "| VAE | steps | of them GAN steps | CPU-s |" in lines[0]
  assert lines[2].startswith("| stems | 100 | 40 | 200 | 2.00 ("), lines[2]
  assert lines[3].startswith("| mixture | 40 | 0 | 80 | 2.60 ("), lines[3]
  # The stems' curves marked at step 60's CPU-s; the mixture never reached its GAN steps.
  for plot in ("vae_mel.png", "vae_si_sdr.png"):
    assert drawn[plot] == {"stems": (120.0, "GAN steps from step 61")}, drawn


def test_the_vae_goals_are_judged_and_counted_per_vae():
  from msldm_jax.evaluation import vae_quality  # pylint: disable=g-import-not-at-top
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  def row(mel, sdr, tagged, real):
    return {"mel_distance": mel, "si_sdr": sdr, vae_quality.TAGGED_RECONSTRUCTED: tagged,
            vae_quality.TAGGED_REAL: real}
  # As read back from strict JSON: NaN is the string "nan" (bass has no tag to judge).
  scores = {"reconstruction": {"bass": row(1.49, 10.0, "nan", "nan"),
                               "guitar": row(2.27, -0.2, 0.585, 0.854),
                               "piano": row(2.54, 1.4, 0.512, 0.585),
                               "drums": row(1.26, -7.4, "nan", 1.0)}}
  lines = report._goal_lines("stems", scores)  # pylint: disable=protected-access
  assert lines[0] == "- stems, bass: mel 1.49 ≤ 1.5 (met); SI-SDR 10.0 dB ≥ 0 (met).", lines
  assert "(not met: 27 points behind, the goal within 10)" in lines[1], lines[1]
  assert "(met: 7 points behind, the goal within 10)" in lines[2], lines[2]
  assert "tagged right nan against real 1.00 (not met: nan points behind" in lines[3]
  # bass 2, guitar 0, piano 2 (SI-SDR, tags), drums 1 (mel) of 2 + 3 + 3 + 3.
  assert lines[-1] == "- stems: 5 of the 11 goals met.", lines[-1]


def test_the_gpu_variant_builds_every_system_at_the_papers_sizes(repo_root):
  """`:variant=gpu` without an accelerator: each system's trainer builds its network on
  latents of the paper's shape (4 × 80 channels, 1024 frames per 327672-sample chunk) from
  abstract shapes alone, so that a config error shows here and not on a lent machine."""
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from msldm_jax.models import denoisers  # pylint: disable=g-import-not-at-top
  from msldm_jax.models import source_vae  # pylint: disable=g-import-not-at-top
  from msldm_jax.models import unet1d  # pylint: disable=g-import-not-at-top
  from msldm_jax.training import train_ldm  # pylint: disable=g-import-not-at-top
  from msldm_jax.training import train_vae  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py:variant=gpu"))
  count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))  # noqa: E731
  # Both VAEs are the paper's shared SourceVAE (61.05 M) with its discriminators, and get the
  # same time and GAN phase.
  mixture = runner.system_config(config, "/w", "mixldm").vae
  for vae_config in (config.vae, mixture):
    vae = source_vae.SourceVAE.from_config(vae_config.model)
    assert round(count(source_vae.abstract_params(vae)["params"]) / 1e6, 2) == 61.05
    train_vae.make_train_spec(vae_config)
  assert (mixture.adversarial_start, mixture.train.max_seconds) == (
      config.vae.adversarial_start, config.vae.train.max_seconds)
  sizes = {}
  for name in runner.study_systems(config):
    system = runner.system_config(config, "/w", name)
    sources = 1 if system.system == "mixldm" else 4
    frames = source_vae.encoded_length(int(system.data.chunks.samples),
                                       system.vae.model.encoder_strides)
    assert frames == 1024 and system.vae.model.latent_dim == 80
    manifest = {"shape": [sources, 80, frames]}
    model_config = train_ldm.model_config_for_latents(system.ldm, manifest, "/w/latents")
    spec = train_ldm.make_train_spec(system.ldm, model_config,
                                     sources if system.system == "isldm" else 0)
    sizes[name] = count(denoisers.abstract_params(spec.model))
  assert list(sizes) == ["msldm", "isldm", "mixldm", "msldm_unet", "msldm_coupled"]
  # The release's U-Net exactly; the DiT base near it; isldm four of mixldm's one-source DiT;
  # the coupled DiT isldm's four streams and their mixers.
  assert sizes["msldm_unet"] == unet1d.RELEASE_PARAMS["release"]
  assert 0.9 < sizes["msldm"] / sizes["msldm_unet"] < 1.2, sizes
  assert sizes["isldm"] == 4 * sizes["mixldm"]
  assert sizes["msldm_coupled"] > sizes["isldm"]
  for sampler, evaluations in runner.sampler_runs(config):
    run = runner.sampler_run_config(config, "/w", sampler, evaluations)
    assert run.sample.num_pieces == 64 and run.sample.num_steps <= evaluations


def test_the_time_table_lists_each_step_and_sums_the_sampler_runs():
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  steps = {name: {"step": name, "wall_seconds": wall, "cpu_seconds": 1.5 * wall}
           for name, wall in (("control", 60.0), ("shared/train_vae", 600.0),
                              ("samplers/heun_2/sample", 30.0),
                              ("samplers/heun_2/evaluate", 6.0),
                              ("samplers/dpmpp_2m_2/sample", 24.0))}
  assert report.time_table(steps)[2:] == [
      "| control | 1.0 | 1.5 |", "| shared/train_vae | 10.0 | 15.0 |",
      "| samplers (every run, sample and evaluate) | 1.0 | 1.5 |"]


def test_the_report_states_a_floor_on_the_decoders_width(repo_root):
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py"))
  vae = lambda: next(line for line in report._departures(config)  # noqa: E731  # pylint: disable=protected-access
                     if line.startswith("- SourceVAE:"))
  assert "decoder width 128, latent 16 per source" in vae()
  config.vae.model.decoder_min_width = 16
  assert "decoder width 128 (no block under 16 channels), latent 16 per source" in vae()


def test_a_second_run_skips_every_step_and_a_scoring_setting_reruns_only_the_scoring(
    repo_root, tmp_path, monkeypatch):
  """The runner's resume logic on stand-in stages: each records that it ran. (The tiny
  study's end-to-end test runs the real stages once.)"""
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  ran, reports = [], []
  for mode in list(runner.STAGES):
    monkeypatch.setitem(runner.STAGES, mode,
                        lambda config, workdir, mode=mode: ran.append((mode, workdir)))
  monkeypatch.setattr(report, "write",
                      lambda config, workdir, report_dir, records: reports.append(records))
  config = config_loading.load_config(os.path.join(repo_root, "configs/study.py:variant=tiny"))
  workdir = str(tmp_path)

  runner.run(config, workdir)
  first = list(ran)
  # The control, the shared stages, each system's and each sampler run's.
  assert first[0] == ("control", workdir)
  assert [mode for mode, _ in first[1:5]] == ["data", "train_vae", "evaluate_vae",
                                              "encode_latents"]
  systems = runner.study_systems(config)
  expected = 1 + 4 + sum(6 if name == "mixldm" else 3 for name in systems) + 2 * len(
      runner.sampler_runs(config))
  assert len(first) == expected
  assert (runner.system_dir(workdir, "mixldm")) in {folder for _, folder in first}
  assert len(reports[-1]) == expected  # the report reads every step's record

  runner.run(config, workdir)
  assert ran == first and len(reports) == 2

  config.evaluate.bootstrap_samples += 1
  runner.run(config, workdir)
  rerun = ran[len(first):]
  assert rerun and {mode for mode, _ in rerun} == {"evaluate", "evaluate_vae"}
  assert len(rerun) == sum(mode in ("evaluate", "evaluate_vae") for mode, _ in first)
