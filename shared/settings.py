"""One settings object per process, read from the environment once in `main()` and passed down.

Every setting is an `EMBEDPIPE_*` environment variable and, in the CLI, a flag defaulting to it.
Secrets (the Redis password, API keys) are never flags: they come from the environment or a file
named by `<NAME>_FILE`, so they never show in `ps`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shared.errors import ConfigError
from shared.keys import Keyspace, check_namespace
from shared.template import ChunkTemplate

ENV_PREFIX = "EMBEDPIPE_"
STAGES = ("load", "chunk", "embed", "write")
# Model runtimes of local models. Each computes other vectors, so the backend is part of the embedding spec.
BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    redis_url: str = setting("redis://localhost:6379/0", "Redis for the queues (passwords only via the environment).")
    namespace: str = setting(
        "", "Key and queue prefix: pipelines with different namespaces share one Redis unseen by each other."
    )
    model: str = setting(
        "all-MiniLM-L6-v2",
        "sentence-transformers model name or local path (an embed worker with several models: the one it serves).",
    )
    models: str = setting(
        "",
        "Several models at once, comma-separated (NAME or NAME@DIMS): each embeds every document into its own "
        "collection, from its own embed queue (README: Several models).",
    )
    store: str = setting("./embedpipe-store", "Vector store: a directory (LanceDB) or a postgresql:// URL (pgvector).")
    device: str = setting("auto", "Device for the model: auto, cpu, cuda, cuda:1, mps.")
    batch_size: int = setting(256, "Most texts per forward pass; micro_batch_tokens usually cuts it first.")
    chunk_tokens: int = setting(0, "Max tokens per chunk; 0 = the model's limit less its special tokens.")
    chunk_overlap: float = setting(0.1, "Overlap between consecutive chunks, as a share of chunk_tokens.")
    chunk_template: str = setting(
        "", "Context the model reads before each chunk, e.g. '{title} > {heading}\\n{chunk}' (README: Chunk template)."
    )
    # Work units: every batch and part costs a few fixed commits and round trips (an rq job per stage,
    # two LanceDB commits per part), so they are sized for a fast embedder: at 64 documents and 65,536
    # tokens a part the writer alone spent 0.32 CPU ms per chunk, at 256 and 131,072 0.12 (bench/fast.py).
    batch_docs: int = setting(256, "Documents per load batch (the unit of work of load and chunk).")
    batch_bytes: int = setting(
        16 * 2**20, "Most bytes of submitted documents per load batch (a batch is cut at batch_docs or this)."
    )
    part_max_chunks: int = setting(1024, "Max chunks per embed part (the unit of work of embed and write).")
    part_max_tokens: int = setting(131072, "Max padded tokens (longest chunk x chunks) per embed part.")
    max_doc_bytes: int = setting(20_000_000, "Documents larger than this become dead letters (too_large).")
    id_prefix: str = setting(
        "", "Put before the ID of every file (its path relative to its root), e.g. 'wiki/' to keep corpora apart."
    )
    fetch_allow: str = setting(
        "", "Hosts, addresses and CIDR networks the loader may fetch URLs from though not public (comma-separated)."
    )
    payload_ttl_s: int = setting(7 * 86400, "How long claim-check payloads live in Redis.")
    load_timeout_s: int = setting(600, "rq timeout of a load job (a batch of documents, URLs fetched).")
    chunk_timeout_s: int = setting(300, "rq timeout of a chunk job (tokenising a batch).")
    embed_timeout_s: int = setting(0, "rq timeout of an embed job; 0 = 60 s + 10 ms per token of the part.")
    write_timeout_s: int = setting(300, "rq timeout of a write job (one part into the store).")
    job_lease_s: int = setting(
        20, "Lease of a running job, renewed every lease/4 s: a killed worker's job is redone once it runs out."
    )
    job_retries: int = setting(3, "rq retries of a failed job before its documents become dead letters.")
    stuck_job_s: int = setting(
        0, "A job running longer than this makes its worker's GET /livez answer 503; 0 = its rq timeout + 180 s."
    )
    max_backlog_jobs: int = setting(
        2000, "The producer, and the janitor batching the inbox, wait while more jobs than this are queued."
    )
    hold_redis_share: float = setting(
        0.8,
        "Past this share of Redis's maxmemory, the producer, the janitor, the loaders, chunkers and embedders wait "
        "while a later stage has jobs queued: the work in flight drains before more grows it (none without a "
        "maxmemory).",
    )
    dead_source_ttl_s: int = setting(30 * 86400, "How long a dead letter keeps its document for redrive.")
    dead_letter_ttl_s: int = setting(90 * 86400, "How long a dead letter is kept (distributed mode).")
    max_dead_letters: int = setting(100_000, "Most dead letters kept (distributed mode); the oldest go first.")
    metrics_port: int = setting(0, "Serve Prometheus /metrics on this port (0: off).")
    probe_eval: str = setting("", "BEIR-layout eval set for the quality probe after each run ('' : no probe).")
    inbox_wait_s: float = setting(1.0, "The janitor waits this long for a full batch from the inbox.")
    log_level: str = setting("INFO", "Logging level.")
    # --- the embedding spec and incremental processing -----------------------------------------
    dimensions: int = setting(0, "Keep N dimensions of each vector, re-normalised (Matryoshka); 0 = all.")
    doc_prefix: str = setting("", "Text put before every chunk when embedding (e.g. 'passage: ' for E5).")
    query_prefix: str = setting("", "Text put before every query when searching (e.g. 'query: ').")
    cache_ttl_s: int = setting(30 * 86400, "How long a cached chunk vector lives unused; 0: no cache in Redis.")
    cache_max_entries: int = setting(2_000_000, "Most chunk vectors the embedded mode's cache keeps.")
    cache_redis_share: float = setting(
        0.5,
        "The Redis cache stores new vectors only while Redis uses less than this share of its maxmemory (the "
        "rest is for the queues; none without a maxmemory).",
    )
    promote_tolerance: float = setting(0.02, "promote refuses a collection whose recall@10 is lower by more.")
    prune_max_fraction: float = setting(
        0.1, "--prune refuses to delete more than this share of a collection's documents (and over 10) unless forced."
    )
    # --- the store at scale ---------------------------------------------------------------------
    ann_min_rows: int = setting(
        50_000, "Build the ANN vector index once a collection holds this many chunks (off the write path); 0 = never."
    )
    # 20 gave recall@10 0.845 on 4.4M chunks of real text (565 partitions), 100 gave 0.978 at p50 32 ms
    # (bench/README.md, scale.py's search); synthetic clustered vectors had hidden it (1.0 at 20).
    search_nprobes: int = setting(100, "LanceDB ANN search: IVF partitions probed per query.")
    search_refine: int = setting(5, "LanceDB ANN search: re-rank k x this candidates on full vectors; 0 = off.")
    # recall@10 on real text, the graph of ef_construction 64 (bench/README.md): 87k chunks, 100: 0.914,
    # 800: 0.987 at p50 7.3 ms; 869k chunks, 400: 0.923, 800: 0.956 at p50 34 ms, 1000 (pgvector's most): 0.964
    # ef_construction 128 (the default), 2.17M chunks: 400: 0.913-0.925, 800: 0.951 at p50 52-58 ms, 1000: 0.955
    ef_search: int = setting(800, "pgvector ANN search: HNSW candidates per query (hnsw.ef_search, at least k).")
    # pgvector's HNSW build, once per collection. On 869k chunks of real text (bench/README.md) the graph
    # of ef_construction 64 levelled off at recall@10 0.956 (ef_search 800: 0.954, 1000: 0.956); 128 gave
    # 0.971 at ef_search 800, room for millions, for 1.8x the build time (1,126 s against 623 s on 2 cores)
    hnsw_m: int = setting(24, "pgvector HNSW index: links per node (m) of an index built from now on (2 to 100).")
    hnsw_ef_construction: int = setting(
        128, "pgvector HNSW index: candidates per insertion while building (4 to 1000, at least 2 x m)."
    )
    # 2.17M chunks of real text (bench/README.md): halfvec's graph had vector's recall@10 at ef_search 800
    # (0.951 both; 0.006-0.014 less at 100-400), its index 0.61x the size, build 0.91x the time, p50 0.90x
    hnsw_type: str = setting(
        "halfvec",
        "pgvector HNSW index: what its graph holds, halfvec (2 bytes a dimension) or vector (4); past 2,000"
        " dimensions (vector's most) always halfvec, past 4,000 no index. Search follows the index there is.",
    )
    hnsw_build_memory_mb: int = setting(
        2048,
        "pgvector HNSW build: the most memory (maintenance_work_mem, MB) it asks for; it asks what its graph"
        " needs (~1.8 KB a 384-d chunk as halfvec), inserts ~9x slower past it. A parallel build holds it in /dev/shm.",
    )
    index_cache_mb: int = setting(
        1024, "LanceDB index cache per process (IVF partitions, BTREE pages): search needs the ANN index in it."
    )
    writer_index_cache_mb: int = setting(
        64, "LanceDB index cache of the chunk and write workers: they look IDs up (BTREE pages), never search."
    )
    malloc_arenas: int = setting(
        2,
        "glibc malloc arenas of a process opening a LanceDB store, its large blocks mmapped, pyarrow's allocations"
        " through it; 0 = glibc's and pyarrow's defaults.",
    )
    # --- throughput -----------------------------------------------------------------------------
    backend: str = setting(
        "torch", "Model runtime: torch (fp16 on CUDA), torch-bf16, onnx, onnx-int8 (ONNX: CPU only)."
    )
    micro_batch_tokens: int = setting(0, "Padded tokens per forward pass; 0 = 4096 on CPU, 65536 on GPU.")
    vector_dtype: str = setting(
        "float32", "Vectors between embedder and writer: float32, or float16 (half the bytes; part of the spec)."
    )
    support_nice: int = setting(
        10, "Niceness the load, chunk and write workers and the janitor take, so embedders get the CPU first."
    )
    # --- OpenAI-compatible API models (EMBEDPIPE_MODEL=openai:NAME) ------------------------------
    openai_base_url: str = setting("", "OpenAI-compatible server for openai:MODEL ('' = api.openai.com).")
    api_concurrency: int = setting(4, "Concurrent embedding requests per embedder process.")
    api_max_inputs: int = setting(2048, "Most inputs per embeddings request.")
    api_max_input_tokens: int = setting(8192, "Most tokens per input (longer inputs never reach the API).")
    api_max_request_tokens: int = setting(300_000, "Most tokens per embeddings request.")
    api_rpm: int = setting(0, "Requests per minute of the account, shared by all embedders; 0 = no limit.")
    api_tpm: int = setting(
        0, "Tokens per minute of the account, shared by all embedders (a request carries at most 1 s of it); 0 = none."
    )
    api_timeout_s: float = setting(30.0, "Timeout of one embeddings request.")
    api_deadline_s: float = setting(300.0, "Stop retrying a request (5xx, timeouts, 429s) after this long.")
    api_prices: str = setting("", "USD per million tokens, overriding the defaults: 'model=0.02,other=0.1'.")
    # Secrets: environment or file only (see module docstring).
    redis_password: str | None = field(default=None, repr=False, metadata={"secret": True})
    openai_api_key: str | None = field(default=None, repr=False, metadata={"secret": True, "also": "OPENAI_API_KEY"})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `EMBEDPIPE_*` variables; `overrides` (e.g. CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("secret"):
                values[f.name] = read_secret(env_name(f.name), env)
                if values[f.name] is None and f.metadata.get("also"):  # the name other tools use
                    values[f.name] = read_secret(f.metadata["also"], env)
            elif env_name(f.name) in env:
                values[f.name] = _parse(f, env[env_name(f.name)])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("models") and "model" not in values:  # the first of several models is the primary
            values["model"], dims = parse_model(values["models"].split(",")[0])
            values.setdefault("dimensions", dims)
        return cls(**values).validated()

    def job_timeout_s(self, stage: str, tokens: int = 0) -> int:
        """The rq timeout of a job of `stage`, from the work it carries."""
        if stage == "embed" and not self.embed_timeout_s:
            if self.model.startswith("openai:"):  # room for the API client's own retries and waits
                return int(max(60 + tokens // 100, self.api_deadline_s + self.api_timeout_s + 60))
            return 60 + tokens // 100  # 100 tokens/s: ~30x slower than a 2-core CPU
        return int(getattr(self, f"{stage}_timeout_s"))

    def validated(self) -> Settings:
        positive = ("batch_size", "batch_docs", "batch_bytes", "part_max_chunks", "part_max_tokens", "max_doc_bytes")
        for name in (
            *positive,
            "dead_letter_ttl_s",
            "max_dead_letters",
            "search_nprobes",
            "ef_search",
            "hnsw_build_memory_mb",
            "index_cache_mb",
            "writer_index_cache_mb",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{env_name(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.chunk_overlap < 0.5:
            raise ConfigError(f"{env_name('chunk_overlap')} must be in [0, 0.5), got {self.chunk_overlap}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{env_name('backend')} must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.support_nice <= 19:
            raise ConfigError(f"{env_name('support_nice')} must be 0 (off) to 19, got {self.support_nice}")
        if not 3 <= self.job_lease_s <= 300:  # rq scores in whole seconds: a beat needs room in the lease
            raise ConfigError(f"{env_name('job_lease_s')} must be 3 to 300 s, got {self.job_lease_s}")
        if self.hnsw_type not in ("vector", "halfvec"):
            raise ConfigError(f"{env_name('hnsw_type')} must be vector or halfvec, got {self.hnsw_type!r}")
        if self.vector_dtype not in ("float32", "float16"):
            raise ConfigError(f"{env_name('vector_dtype')} must be float32 or float16, got {self.vector_dtype!r}")
        if self.stuck_job_s < 0:
            raise ConfigError(f"{env_name('stuck_job_s')} must be >= 0 (0 = the job's rq timeout + 180 s)")
        if self.micro_batch_tokens < 0:
            raise ConfigError(f"{env_name('micro_batch_tokens')} must be >= 0 (0 = the device's default)")
        if not 0 < self.cache_redis_share < self.hold_redis_share <= 1:
            raise ConfigError(
                f"{env_name('cache_redis_share')} ({self.cache_redis_share:g}) must be above 0 and below "
                f"{env_name('hold_redis_share')} ({self.hold_redis_share:g}), which must be at most 1: the cache "
                "stops growing before the pipeline holds its work"
            )
        if not 0 <= self.prune_max_fraction <= 1:
            raise ConfigError(f"{env_name('prune_max_fraction')} must be in [0, 1], got {self.prune_max_fraction}")
        if not 2 <= self.hnsw_m <= 100 or not max(4, 2 * self.hnsw_m) <= self.hnsw_ef_construction <= 1000:
            raise ConfigError(
                f"{env_name('hnsw_m')} must be 2 to 100 and {env_name('hnsw_ef_construction')} 2 x m to 1000"
                f" (pgvector's limits), got {self.hnsw_m} and {self.hnsw_ef_construction}"
            )
        check_namespace(self.namespace)
        ChunkTemplate.parse(self.chunk_template, env_name("chunk_template"))
        for name in ("ann_min_rows", "search_refine"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{env_name(name)} must be >= 0, got {getattr(self, name)}")
        if self.chunk_tokens < 0:
            raise ConfigError(f"{env_name('chunk_tokens')} must be >= 0")
        if urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"{env_name('redis_url')} must be a redis://, rediss:// or unix:// URL")
        return self

    @property
    def store_path(self) -> Path:
        return Path(self.store).expanduser()

    @property
    def keys(self) -> Keyspace:
        """This pipeline's Redis keys (its namespace's)."""
        return Keyspace(self.namespace)

    @property
    def local_state_dir(self) -> Path:
        """Where the embedded runtime keeps its dead letters, counters and embedding cache: inside a
        directory store; for a server store (postgresql://), a directory of this user's named after the
        store's URL without its password: ~/.local/state/embedpipe/store-<hash>."""
        if "://" not in self.store:
            return self.store_path
        digest = hashlib.blake2b(redact_url(self.store).encode(), digest_size=8).hexdigest()
        return Path.home() / ".local" / "state" / "embedpipe" / f"store-{digest}"

    @property
    def store_redacted(self) -> str:
        """The store as logs and summaries show it: a directory's absolute path, a URL without its password."""
        return redact_url(self.store) if "://" in self.store else str(self.store_path.resolve())

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)


def parse_model(entry: str) -> tuple[str, int]:
    """NAME or NAME@DIMS (the first DIMS dimensions, re-normalised; sent as `dimensions` to an API)."""
    name, at, dims = entry.strip().rpartition("@")
    if not at or not dims.isdigit():
        return entry.strip(), 0
    return name, int(dims)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def read_secret(name: str, environ: Mapping[str, str]) -> str | None:
    """A secret comes from `NAME` or from the file named by `NAME_FILE` (Docker/Kubernetes secrets)."""
    if environ.get(name):
        return environ[name]
    path = environ.get(name + "_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read {name}_FILE={path}: {e.strerror}") from e
    return None


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = type(f.default)
    try:
        return kind(raw) if kind in (int, float) else raw
    except ValueError as e:
        raise ConfigError(f"{env_name(f.name)}={raw!r} is not a valid {kind.__name__}") from e


def setting_fields() -> list[dataclasses.Field[Any]]:
    """The settings that are also CLI flags (everything but secrets)."""
    return [f for f in dataclasses.fields(Settings) if not f.metadata.get("secret")]
