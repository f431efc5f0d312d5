"""The committed gRPC stubs are exactly what `make protos` generates from protos/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_up_to_date(tmp_path):
    generated = load_generator().generate(tmp_path)
    committed_dir = ROOT / "generated" / "viper_proto"
    fresh = {path.relative_to(tmp_path / "viper_proto"): path.read_bytes() for path in generated}
    committed = {
        path.relative_to(committed_dir): path.read_bytes()
        for path in committed_dir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert sorted(committed) == sorted(fresh), "stub files differ from protos/: run `make protos`"
    stale = [str(name) for name, data in fresh.items() if committed[name] != data]
    assert not stale, f"stale stubs (run `make protos`): {stale}"


def test_services_keep_their_public_names():
    from viper_proto.v1 import generation_pb2, metric_pb2, profile_pb2

    assert set(profile_pb2.DESCRIPTOR.services_by_name["ProfileService"].methods_by_name) == {
        "ExtractProfile", "GetProfile", "ListProfiles", "UpdateProfile", "DeleteProfile",
        "AddRatings", "RemoveRatings", "ListProfileVersions", "RestoreProfileVersion", "ExportProfile",
        "ImportProfile",
    }
    assert "Generate" in generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].methods_by_name
    assert "Score" in metric_pb2.DESCRIPTOR.services_by_name["MetricService"].methods_by_name
    assert profile_pb2.DESCRIPTOR.package == "viper.v1"
