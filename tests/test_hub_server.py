"""The test Hub itself answers the client calls the deploy code does not make (paths-info,
folder listing, dataset revision info), so a later user of the fixture can rely on them."""

from __future__ import annotations

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError


@pytest.fixture
def api(local_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at call time; the env var only at import
    return HfApi(endpoint=local_hub.url, token=local_hub.token)


def test_dataset_repo_contract(api, local_hub):
    api.create_repo("org/ds", repo_type="dataset", private=True)
    ops = [CommitOperationAdd("data/train.parquet", b"PAR1" + bytes(range(256)) * 4),
           CommitOperationAdd("data/notes.txt", b"hello\n"), CommitOperationAdd("README.md", b"# ds\n")]
    head = api.dataset_info("org/ds").sha
    commit = api.create_commit("org/ds", ops, repo_type="dataset", commit_message="add", parent_commit=head).oid
    info = api.dataset_info("org/ds", revision=commit)
    assert info.sha == commit and info.private and {s.rfilename for s in info.siblings} >= {"data/notes.txt", "README.md"}
    listed = {e.path for e in api.list_repo_tree("org/ds", "data", repo_type="dataset")}
    assert listed == {"data/train.parquet", "data/notes.txt"}
    [parquet, notes] = api.get_paths_info("org/ds", ["data/train.parquet", "data/notes.txt"], repo_type="dataset")
    assert parquet.lfs is not None and parquet.lfs.size == 1028 and notes.lfs is None and notes.size == 6
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit("org/ds", [CommitOperationAdd("x", b"x")], repo_type="dataset", commit_message="x",
                          parent_commit=head)
    assert stale.value.response.status_code == 412
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=local_hub.url, token=False).dataset_info("org/ds")
