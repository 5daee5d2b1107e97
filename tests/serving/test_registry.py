"""ModelRegistry in-process: version states, routing (newest READY, by modality), leases, unload, polling."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from inference.config import DEFAULT_MODELS, load_config
from inference.errors import ModalityMismatchError, ModelNotFoundError
from inference.modelrepo.repository import discover, sources_at
from inference.modelrepo.schema import ModelConfig
from inference.serving.registry import FAILED, LOADING, READY, UNLOADING, ModelRegistry
from inference.serving.watcher import RepositoryWatcher
from inference.tasks.detection import DetectionTask

ROOT = Path(__file__).resolve().parents[2]
LUNG = ROOT / "models" / "lung_nodule_ct" / "1"
CPU = torch.device("cpu")


def write_version(repo: Path, name: str = "lung_nodule_ct", version: str = "1", *, modalities=None, seed=0) -> Path:
    """models/lung_nodule_ct/1 under another name/version, with 32^3 patches (fast on a CPU); its weights are
    copied when committed, else random ones of the right shapes (seeded)."""
    data = yaml.safe_load((LUNG / "model.yaml").read_text())
    data["name"] = name
    data["inferer"]["roi_size"] = [32, 32, 32]
    if modalities:
        data["modalities"] = list(modalities)
    directory = repo / name / version
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(yaml.safe_dump(data))
    if (LUNG / "model.pt").is_file() and seed == 0:
        shutil.copy(LUNG / "model.pt", directory / "model.pt")
    else:
        torch.manual_seed(seed)
        config = ModelConfig.from_dict(data, version=version)
        torch.save(DetectionTask(config, CPU).build_network().state_dict(), directory / "model.pt")
    return directory


def states(registry: ModelRegistry, name: str) -> dict[str, tuple[str, str]]:
    row = next(r for r in registry.list_models() if r.name == name)
    return {v.version: (v.state, v.reason) for v in row.versions if v.state != UNLOADING}


def run(coro):
    return asyncio.run(coro)


def test_newest_ready_version_serves_and_a_broken_one_is_failed_with_its_reason(tmp_path):
    write_version(tmp_path, version="1")
    write_version(tmp_path, version="2", seed=1)
    (write_version(tmp_path, version="10", seed=2) / "model.yaml").write_text("name: [unclosed\n")
    write_version(tmp_path, version="11", seed=3)
    (tmp_path / "lung_nodule_ct" / "11" / "model.pt").unlink()

    async def scenario():
        registry = ModelRegistry(CPU, warmup=False)
        await registry.load_repository(tmp_path)
        try:
            found = states(registry, "lung_nodule_ct")
            assert found["1"][0] == found["2"][0] == READY
            assert found["10"][0] == FAILED and found["10"][1].startswith("ParserError: while parsing")
            assert found["11"] == (FAILED, "ValueError: weights file 'model.pt' is missing")
            # "10" > "2" in natural order, but it is not READY: the newest READY version serves.
            assert registry.resolve("lung_nodule_ct", None, "CT").key == "lung_nodule_ct:2"
            assert registry.resolve(None, None, "CT").key == "lung_nodule_ct:2"
            assert registry.resolve("lung_nodule_ct", "1", "CT").key == "lung_nodule_ct:1"
            with pytest.raises(ModelNotFoundError, match="failed to load"):
                registry.resolve("lung_nodule_ct", "11", "CT")
            with pytest.raises(ModelNotFoundError, match="no version '7'"):
                registry.resolve("lung_nodule_ct", "7", "CT")
            with pytest.raises(ModalityMismatchError, match="reads CT studies, not MR"):
                registry.resolve("lung_nodule_ct", None, "MR")
            row = next(r for r in registry.list_models() if r.name == "lung_nodule_ct")
            assert row.default_version == "2" and row.config.name == "lung_nodule_ct"
        finally:
            await registry.close()

    run(scenario())


def test_modality_routing_prefers_the_configured_default_then_name_order(tmp_path):
    write_version(tmp_path, "a_ct")
    write_version(tmp_path, "b_ct", seed=1)
    write_version(tmp_path, "c_mr", modalities=["MR"], seed=2)

    async def scenario(default_models):
        registry = ModelRegistry(CPU, default_models=default_models, warmup=False)
        await registry.load_repository(tmp_path)
        try:
            with pytest.raises(ModalityMismatchError, match="no loaded model reads DX"):
                registry.resolve(None, None, "DX")
            return (
                registry.resolve(None, None, "CT").key,
                registry.resolve(None, None, "MR").key,
                dict(registry.default_routes()),
            )
        finally:
            await registry.close()

    assert run(scenario({"CT": "b_ct"}))[:2] == ("b_ct:1", "c_mr:1")
    # No preference (or a preferred model that is not loaded): the first model by name that takes the modality.
    ct, mr, routes = run(scenario({"CT": "lung_nodule_ct"}))
    assert (ct, mr) == ("a_ct:1", "c_mr:1") and routes == {"CT": "a_ct:1", "MR": "c_mr:1"}


def test_default_models_config_defaults_and_overrides():
    assert DEFAULT_MODELS == {"CT": "lung_nodule_ct", "MR": "brain_lesion_mr", "CR": "chest_xray", "DX": "chest_xray"}
    config = load_config({"default_models": "CT=spleen_ct_segmentation,DX="}, environ={})
    assert config.default_models == {"CT": "spleen_ct_segmentation", "MR": "brain_lesion_mr", "CR": "chest_xray"}
    with pytest.raises(ValueError, match="'PET'"):
        load_config({"default_models": "PET=x"}, environ={})
    with pytest.raises(ValueError, match="model_poll_interval_s"):
        load_config({"model_poll_interval_s": -1}, environ={})


def test_unload_waits_for_leased_reads_and_is_sticky(tmp_path):
    write_version(tmp_path, version="1")
    write_version(tmp_path, version="2", seed=1)

    async def scenario():
        registry = ModelRegistry(CPU, warmup=False)
        await registry.load_repository(tmp_path)
        watcher = RepositoryWatcher(registry, tmp_path, 60, settle_s=0)
        try:
            async with registry.lease(None, None, "CT") as runner:
                assert runner.key == "lung_nodule_ct:2"
                assert await registry.unload("lung_nodule_ct", "2") == ["lung_nodule_ct:2"]
                assert registry.resolve(None, None, "CT").key == "lung_nodule_ct:1"  # routing moved at once
                await asyncio.sleep(0.2)
                row = next(r for r in registry.list_models() if r.name == "lung_nodule_ct")
                assert [(v.version, v.state) for v in row.versions] == [("1", READY), ("2", UNLOADING)]
                assert runner.batcher._task is not None and not runner.batcher._task.done()  # still serving us
            for _ in range(50):  # released: the drain finishes and the runner stops
                if not registry._retiring:
                    break
                await asyncio.sleep(0.05)
            assert not registry._retiring and runner.batcher._task.done()
            await watcher.poll_once()  # unload is sticky: polling does not bring "2" back
            assert "2" not in states(registry, "lung_nodule_ct")
            (entry,) = [state for _, state, _ in await registry.load_path(tmp_path / "lung_nodule_ct" / "2")]
            assert entry.state == READY and registry.resolve(None, None, "CT").key == "lung_nodule_ct:2"
            with pytest.raises(ModelNotFoundError):
                await registry.unload("nope")
        finally:
            await registry.close()

    run(scenario())


def test_polling_loads_new_versions_reloads_changed_weights_and_unloads_removed_ones(tmp_path):
    write_version(tmp_path, version="1")

    async def scenario():
        registry = ModelRegistry(CPU, warmup=False)
        await registry.load_repository(tmp_path)
        watcher = RepositoryWatcher(registry, tmp_path, 60, settle_s=0)
        try:
            first = registry.resolve(None, None, "CT")
            weights = tmp_path / "lung_nodule_ct" / "1" / "model.pt"
            os.utime(weights)  # touched, same content: no reload
            await watcher.poll_once()
            assert registry.resolve(None, None, "CT") is first

            write_version(tmp_path, version="2", seed=1)
            await watcher.poll_once()
            assert registry.resolve(None, None, "CT").key == "lung_nodule_ct:2"

            shutil.copy(tmp_path / "lung_nodule_ct" / "2" / "model.pt", weights)  # replaced in place
            await watcher.poll_once()
            reloaded = registry.resolve("lung_nodule_ct", "1", "CT")
            assert reloaded is not first and states(registry, "lung_nodule_ct")["1"] == (READY, "")

            weights.write_bytes(b"not a checkpoint")  # a broken replacement: the previous load keeps serving
            await watcher.poll_once()
            assert registry.resolve("lung_nodule_ct", "1", "CT") is reloaded
            state, reason = states(registry, "lung_nodule_ct")["1"]
            assert state == READY and reason.startswith("reload failed, the previous load keeps serving")

            shutil.rmtree(tmp_path / "lung_nodule_ct" / "2")
            await watcher.poll_once()
            assert "2" not in states(registry, "lung_nodule_ct")
            assert registry.resolve(None, None, "CT").key == "lung_nodule_ct:1"
        finally:
            await registry.close()

    run(scenario())


def test_discovery_and_load_paths(tmp_path):
    write_version(tmp_path, version="1")
    bundle = tmp_path / "some_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text('{"name": "Spleen CT segmentation", "version": "0.5.3"}')
    assert [(s.key, s.kind) for s in discover(tmp_path)] == [
        ("lung_nodule_ct:1", "yaml"),
        ("spleen_ct_segmentation:0.5.3", "bundle"),
    ]
    assert [s.key for s in sources_at(Path("lung_nodule_ct"), tmp_path)] == ["lung_nodule_ct:1"]
    assert [s.key for s in sources_at(tmp_path / "lung_nodule_ct" / "1")] == ["lung_nodule_ct:1"]
    assert [s.key for s in sources_at(bundle)] == ["spleen_ct_segmentation:0.5.3"]
    with pytest.raises(FileNotFoundError, match="does not exist on the server"):
        sources_at(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"holds no model\.yaml"):
        sources_at(bundle / "configs")


def test_a_version_is_loading_until_ready_and_a_reload_keeps_serving_meanwhile(tmp_path):
    directory = write_version(tmp_path, version="1")

    async def scenario():
        registry = ModelRegistry(CPU, warmup=False)
        seen = []
        registry.runner_setup = lambda runner: seen.append(states(registry, "lung_nodule_ct")["1"])
        await registry.load_repository(tmp_path)
        try:
            assert seen == [(LOADING, "")]
            serving = registry.resolve(None, None, "CT")
            torch.save({k: v + 1 for k, v in torch.load(directory / "model.pt").items()}, directory / "model.pt")
            (source,) = discover(tmp_path)
            await registry.load(source)
            assert seen[1] == (READY, "reloading: its files changed; the previous load serves meanwhile")
            assert registry.resolve(None, None, "CT") is not serving
            assert states(registry, "lung_nodule_ct")["1"] == (READY, "")
        finally:
            await registry.close()

    run(scenario())
