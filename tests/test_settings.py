import pytest

from shared.errors import ConfigError
from shared.settings import Settings, redact_url


def test_environment_is_read_and_overrides_win():
    s = Settings.from_env({"EMBEDPIPE_BATCH_SIZE": "8", "EMBEDPIPE_MODEL": "m"}, model="other")
    assert (s.batch_size, s.model) == (8, "other")


def test_secret_comes_from_a_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    s = Settings.from_env({"EMBEDPIPE_REDIS_PASSWORD_FILE": str(secret)})
    assert s.redis_password == "hunter2"
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize(
    "env",
    [
        {"EMBEDPIPE_BATCH_SIZE": "many"},
        {"EMBEDPIPE_BATCH_SIZE": "0"},
        {"EMBEDPIPE_REDIS_URL": "http://x"},
        {"EMBEDPIPE_CHUNK_OVERLAP": "0.9"},
        {"EMBEDPIPE_BACKEND": "bf16"},
        {"EMBEDPIPE_SUPPORT_NICE": "20"},
        {"EMBEDPIPE_JOB_LEASE_S": "0"},
        {"EMBEDPIPE_JOB_LEASE_S": "600"},
        {"EMBEDPIPE_REDIS_PASSWORD_FILE": "/nonexistent/pw"},
        {"EMBEDPIPE_PRUNE_MAX_FRACTION": "1.5"},
        {"EMBEDPIPE_HNSW_M": "1"},
        {"EMBEDPIPE_HNSW_M": "32", "EMBEDPIPE_HNSW_EF_CONSTRUCTION": "40"},  # pgvector wants >= 2 x m
        {"EMBEDPIPE_HNSW_BUILD_MEMORY_MB": "0"},
        {"EMBEDPIPE_HNSW_TYPE": "bit"},
        {"EMBEDPIPE_CACHE_REDIS_SHARE": "0"},
        {"EMBEDPIPE_CACHE_REDIS_SHARE": "0.9"},  # above the hold (0.8): the cache would grow past it
        {"EMBEDPIPE_HOLD_REDIS_SHARE": "1.5"},
    ],
)
def test_invalid_settings_are_clear_errors(env):
    with pytest.raises(ConfigError, match="EMBEDPIPE_"):
        Settings.from_env(env)


def test_passwords_are_redacted():
    assert redact_url("redis://user:s3cret@host:6380/2") == "redis://user:***@host:6380/2"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_the_embedded_runs_state_lives_in_a_directory_store_or_per_server_store_without_its_password(tmp_path):
    assert Settings(store=str(tmp_path / "store")).local_state_dir == tmp_path / "store"
    a, b = (Settings(store=f"postgresql://me:{pw}@db:5432/vectors") for pw in ("one", "two"))
    assert a.local_state_dir == b.local_state_dir and "one" not in str(a.local_state_dir)
    assert a.local_state_dir != Settings(store="postgresql://me@db:5432/other").local_state_dir
    assert a.store_redacted == "postgresql://me:***@db:5432/vectors"
