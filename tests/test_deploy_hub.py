"""Push / pull against the local Hub-compatible server, through the real huggingface_hub client,
with the CLI run in a subprocess (the client reads HF_ENDPOINT at import time)."""

from __future__ import annotations

from exportline.deploy.prepare import prepare_bundle
from exportline.exporters.core.bundle import Bundle, sha256_file

from bundle_helpers import mismatched
from deploy_bundle import rewrite_report

REPO = "org/tiny"


def _files(repo) -> dict[str, str]:
    """path → sha256 (LFS) or git oid (regular) of the repo's main head."""
    head = repo.resolve("main")
    return {p: e.sha256 or e.oid for p, e in head.files.items()}


def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_push_commits_once_and_repush_changes_nothing(local_hub, deploy_bundle):
    first = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--tag", "v1.0.0", env_token=local_hub.token)
    assert first.returncode == 0, first.stderr
    repo = local_hub.state.repo(REPO)
    head = repo.branches["main"]
    manifest = Bundle(deploy_bundle).read_manifest()
    remote = repo.resolve("main").files
    for f in manifest["files"]:  # every bundle file is on the Hub with the manifest's checksum
        entry = remote[f["path"]]
        assert entry.size == f["bytes"]
        if entry.sha256:
            assert entry.sha256 == f["sha256"]
    assert {"README.md", "manifest.json", "hubconf.py", "onnx/model.onnx_data", "model.safetensors"} <= remote.keys()
    assert remote["model.safetensors"].sha256 and remote["onnx/model.onnx_data"].sha256  # went through LFS
    assert repo.tags == {"v1.0.0": head}
    assert len(repo.commits) == 2  # the repo's initial commit + ONE commit with every file

    second = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--tag", "v1.0.0", env_token=local_hub.token)
    assert second.returncode == 0, second.stderr
    assert "already up to date" in second.stdout and "tag v1.0.0 already" in second.stdout
    assert repo.branches["main"] == head and len(repo.commits) == 2 and repo.tags == {"v1.0.0": head}
    assert local_hub.state.count("commit") == 1 and local_hub.state.count("tag") == 1


def test_pull_by_tag_checks_every_file_and_loads(local_hub, deploy_bundle, tmp_path):
    assert local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--tag", "v1.0.0",
                         env_token=local_hub.token).returncode == 0
    tagged = {f["path"]: f["sha256"] for f in Bundle(deploy_bundle).read_manifest()["files"]}
    bench = deploy_bundle / "reports" / "bench.json"
    rewrite_report(deploy_bundle, "reports/bench.json", bench.read_text().replace("2000.0", "2100.0"))  # main moves on
    assert local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token).returncode == 0

    out = tmp_path / "pulled"
    pulled = local_hub.cli("pull", REPO, "--revision", "v1.0.0", "--out", str(out), env_token=local_hub.token)
    assert pulled.returncode == 0, pulled.stderr
    got = {f["path"]: f["sha256"] for f in Bundle(out).read_manifest()["files"]}
    assert got == tagged  # the tag's files, not main's
    assert all(sha256_file(out / p) == s for p, s in got.items())
    assert mismatched(out) == []  # a normal bundle: manifest and bytes agree
    assert not (out / ".cache").exists() and not (out / ".gitattributes").exists()
    assert "trt/fp16.sm90.trt10.13.0.plan: unusable: TensorRT not installed" in pulled.stdout
    assert f"exportline export {out} --stages trt" in pulled.stdout
    pulled_info = Bundle(out).read_manifest()["pulled"]
    assert pulled_info["commit"] == local_hub.state.repo(REPO).tags["v1.0.0"]
    assert pulled_info["engines"]["trt/fp16.sm90.trt10.13.0.plan"]["usable"] is False

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_private_repo_refuses_anonymous_pull(local_hub, deploy_bundle, tmp_path):
    assert local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--private",
                         env_token=local_hub.token).returncode == 0
    assert local_hub.state.repo(REPO).private
    anonymous = local_hub.cli("pull", REPO, "--out", str(tmp_path / "anon"))
    assert anonymous.returncode != 0
    assert "not found, or private" in _error_line(anonymous)
    assert not (tmp_path / "anon").exists() and not list(tmp_path.glob(".anon.pull-*"))
    with_token = local_hub.cli("pull", REPO, "--out", str(tmp_path / "mine"), "--token", local_hub.token)
    assert with_token.returncode == 0, with_token.stderr


def test_push_refuses_to_make_an_existing_public_repo_private(local_hub, deploy_bundle):
    assert local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token).returncode == 0
    commits = len(local_hub.state.repo(REPO).commits)
    again = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--private", env_token=local_hub.token)
    assert again.returncode != 0 and "is public, but --private" in _error_line(again)
    assert len(local_hub.state.repo(REPO).commits) == commits


def test_tampered_file_is_named_and_nothing_is_kept(local_hub, deploy_bundle, tmp_path):
    assert local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token).returncode == 0
    for path in ("model.safetensors", "config.json"):  # an LFS object and a regular git file
        original = (deploy_bundle / path).read_bytes()
        flipped = original[:100] + bytes([original[100] ^ 1]) + original[101:]  # same size: only sha256 can tell
        local_hub.state.tamper(REPO, path, flipped)
        out = tmp_path / f"pulled-{path}"
        proc = local_hub.cli("pull", REPO, "--out", str(out), env_token=local_hub.token)
        assert proc.returncode != 0
        assert f"error: {path} does not match manifest.json" in _error_line(proc)
        assert not out.exists() and not list(tmp_path.glob(".pulled-*"))
        local_hub.state.tamper(REPO, path, original)


def test_server_error_mid_push_then_rerun_completes_without_resending(local_hub, deploy_bundle):
    local_hub.state.fail("commit", nth=1, status=500)  # after every LFS upload, the commit fails
    failed = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token)
    assert failed.returncode != 0
    line = _error_line(failed)
    assert "500" in line and "run the same command again" in line
    repo = local_hub.state.repo(REPO)
    assert set(_files(repo)) == {".gitattributes"}  # nothing half-committed
    uploads = local_hub.state.count("lfs-upload")
    assert uploads >= 5

    rerun = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token)
    assert rerun.returncode == 0, rerun.stderr
    assert local_hub.state.count("lfs-upload") == uploads  # the Hub had the objects: none sent twice
    assert "model.safetensors" in _files(repo) and len(repo.commits) == 2


def test_transient_lfs_upload_error_is_retried(local_hub, deploy_bundle):
    local_hub.state.fail("lfs-upload", nth=1, status=503)  # the client backs off 1 s and retries
    proc = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token)
    assert proc.returncode == 0, proc.stderr
    assert [s for k, _, s in local_hub.state.log if k == "lfs-upload"].count(503) == 1


def test_concurrent_commit_is_not_overwritten(local_hub, deploy_bundle):
    assert local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token).returncode == 0
    bench = deploy_bundle / "reports" / "bench.json"
    rewrite_report(deploy_bundle, "reports/bench.json", bench.read_text().replace("800.0", "810.0"))
    local_hub.state.before("commit", lambda state: state.direct_commit(REPO, "NOTES.md", b"edited in the web UI\n"))
    proc = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token)
    assert proc.returncode != 0
    assert "changed on the Hub while this ran" in _error_line(proc)
    files = local_hub.state.repo(REPO).resolve("main").files
    assert files["NOTES.md"].data == b"edited in the web UI\n"
    assert b"810.0" not in files["reports/bench.json"].data  # the stale plan was not applied


def test_token_looking_string_in_bundle_is_refused(local_hub, deploy_bundle):
    planted = "hf_" + "Q7" * 17
    notes = deploy_bundle / "reports" / "verify.md"
    rewrite_report(deploy_bundle, "reports/verify.md", notes.read_text() + f"\nlogin with {planted}\n")
    proc = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token)
    assert proc.returncode != 0
    line = _error_line(proc)
    assert "reports/verify.md" in line and "looks like a Hugging Face token" in line
    assert planted not in proc.stdout + proc.stderr
    assert local_hub.state.log == []  # refused before any request


def test_token_never_printed_or_written(local_hub, deploy_bundle, tmp_path):
    out = tmp_path / "pulled"
    runs = [
        local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--token", local_hub.token, "--tag", "v0.1.0"),
        local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, env_token=local_hub.token),
        local_hub.cli("pull", REPO, "--out", str(out), "--token", local_hub.token),
    ]
    local_hub.home.mkdir(parents=True, exist_ok=True)
    (local_hub.home / "token").write_text(local_hub.token)  # where `hf auth login` keeps it
    runs.append(local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--private", "--tag", "v0.1.0"))
    assert [r.returncode for r in runs[:3]] == [0, 0, 0], [r.stderr for r in runs]
    assert runs[3].returncode != 0 and "is public, but --private" in runs[3].stderr  # authenticated via the store
    for r in runs:
        assert local_hub.token not in r.stdout + r.stderr
    for folder in (deploy_bundle, out):
        for path in folder.rglob("*"):
            if path.is_file():
                assert local_hub.token.encode() not in path.read_bytes(), path


def test_no_token_is_a_clear_error(local_hub, deploy_bundle):
    proc = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO)
    assert proc.returncode != 0 and "no Hugging Face token" in _error_line(proc)
    assert local_hub.state.log == []


def _tree(folder) -> dict[str, tuple]:
    """Every path under folder (dot files included) → (sha256, mode, mtime_ns)."""
    return {p.relative_to(folder).as_posix(): (sha256_file(p) if p.is_file() else None, p.stat().st_mode, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def test_dry_run_changes_nothing_and_lists_what_a_push_sends(local_hub, deploy_bundle):
    before = _tree(deploy_bundle)
    assert REPO not in (deploy_bundle / "README.md").read_text()  # the card names the repo only once pushed
    proc = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--dry-run", "--include", "hf,reports")
    assert proc.returncode == 0, proc.stderr
    assert _tree(deploy_bundle) == before
    assert "nothing uploaded" in proc.stdout
    assert local_hub.state.log == [] and local_hub.state.repos == {}
    listed = {line.split()[-1]: int(line.split()[0].replace(",", "")) for line in proc.stdout.splitlines()[:-1]}

    prepare_bundle(deploy_bundle, repo_id=REPO)  # what a push writes before it uploads
    manifest = Bundle(deploy_bundle).read_manifest()
    expected = {f["path"]: f["bytes"] for f in manifest["files"] if not f["path"].startswith(("onnx/", "trt/"))}
    assert {"README.md", "hubconf.py"} <= expected.keys() and REPO in (deploy_bundle / "README.md").read_text()
    assert listed == {**expected, "manifest.json": Bundle(deploy_bundle).manifest_path.stat().st_size}


def test_partial_push_pulls_as_a_bundle_missing_those_files(local_hub, deploy_bundle, tmp_path):
    proc = local_hub.cli("push", str(deploy_bundle), "--repo-id", REPO, "--include", "hf,reports",
                         env_token=local_hub.token)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.startswith(("onnx/", "trt/")) for p in _files(local_hub.state.repo(REPO)))
    out = tmp_path / "pulled"
    pulled = local_hub.cli("pull", REPO, "--out", str(out), env_token=local_hub.token)
    assert pulled.returncode == 0, pulled.stderr
    assert "not in the repo (pushed with --include): onnx/model.onnx" in pulled.stdout
    assert mismatched(out) == []


def test_push_dataset_and_card_links_it(local_hub, deploy_bundle, tmp_path):
    data = tmp_path / "corpus"
    (data / "train").mkdir(parents=True)
    (data / "train" / "part-0.txt").write_text("the quick brown fox\n" * 50)
    (data / "README.md").write_text("# corpus\n")
    proc = local_hub.cli("push-dataset", str(data), "--repo-id", "org/corpus", "--bundle", str(deploy_bundle),
                         env_token=local_hub.token)
    assert proc.returncode == 0, proc.stderr
    files = local_hub.state.repo("org/corpus", "dataset").resolve("main").files
    assert files["train/part-0.txt"].data == (data / "train" / "part-0.txt").read_bytes()
    assert Bundle(deploy_bundle).read_manifest()["datasets"] == ["org/corpus"]
    card = (deploy_bundle / "README.md").read_text()
    assert "datasets:\n- org/corpus" in card and f"({local_hub.url}/datasets/org/corpus)" in card
    assert local_hub.cli("card", "check", str(deploy_bundle)).returncode == 0
    again = local_hub.cli("push-dataset", str(data), "--repo-id", "org/corpus", env_token=local_hub.token)
    assert again.returncode == 0 and len(local_hub.state.repo("org/corpus", "dataset").commits) == 2
    bad = local_hub.cli("push-dataset", str(data), "--repo-id", "bad id")
    assert bad.returncode != 0 and "is not ORG/NAME" in _error_line(bad)
