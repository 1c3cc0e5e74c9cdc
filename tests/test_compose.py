"""docker-compose.yml and the Dockerfile, checked without Docker: every command is a real command
of this version, every variable one the settings know, and the image is slim and non-root.

Docker does not run on the machine CI uses, so nothing here starts the stack: MinIO's and
Redis's own commands are checked for the options adevents relies on, not executed. Prometheus's
and Grafana's files under deploy/ are checked against the mounts that carry them here; a real
Prometheus runs them in tests/test_prometheus.py. The Kafka profile's broker and topic are
checked for what the consumers rely on (one node's listeners, replication, partitions); its
adevents health checks run here against librdkafka's mock cluster and a real Redis."""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from cli import COMMANDS, build_parser
from pipeline.kafka_testing import MockCluster
from pipeline.schema import Layout
from pipeline.settings import Settings
from pipeline.status import ConsumerStatus, State, write_status

ROOT = Path(__file__).resolve().parent.parent
#: The Kafka path: started only by `docker compose --profile kafka`.
KAFKA_PROFILE = {
    "kafka",
    "kafka-init",
    "generator-kafka",
    "consumer-kafka-0",
    "consumer-kafka-1",
    "consumer-kafka-2",
    "ingest-kafka",
}
SERVICES = {
    "redis",
    "minio",
    "minio-init",
    "generator",
    "consumer-0",
    "consumer-1",
    "api",
    "scheduler",
    "prometheus",
    "grafana",
    *KAFKA_PROFILE,
}
#: Services that run something other than adevents.
OTHERS = {"redis", "minio", "minio-init", "prometheus", "grafana", "kafka", "kafka-init"}
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}
RUNTIME_LOCK = "requirements/runtime.lock"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if n not in OTHERS}


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def check_adevents(args: list[str]) -> None:
    """Parse ``adevents ARGS`` as the CLI of this version does; fail on anything unknown."""
    assert args and args[0] in COMMANDS, f"no adevents subcommand {args[:1]}"
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"`adevents {shlex.join(args)}` does not parse (exit {exc.code})")
    assert parsed.command == args[0]


def check_litestar(args: list[str]) -> None:
    """``litestar --app module:attribute run ...``: the app must exist."""
    assert "--app" in args and "run" in args, args
    module, _, attribute = args[args.index("--app") + 1].partition(":")
    assert hasattr(importlib.import_module(module), attribute)


def check_python_snippet(code: str) -> None:
    """A ``python -c`` health check: it compiles, and what it imports from adevents exists."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name} does not exist"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


def check_command(args: list[str]) -> None:
    if args[0] == "adevents":
        check_adevents(args[1:])
    elif args[0] == "litestar":
        check_litestar(args[1:])
    elif args[0] == "python" and args[1] == "-c":
        check_python_snippet(args[2])
    else:
        pytest.fail(f"not an adevents, litestar or python -c command: {args}")


# -- compose -----------------------------------------------------------------------------------
def test_the_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES
    # Two consumers on two slots of one spool: never two processes on one slot.
    slots = [services[f"consumer-{n}"]["environment"]["CONSUMER_SLOT"] for n in (0, 1)]
    assert slots == ["0", "1"]
    # The Kafka path is a profile: `docker compose up` without it starts what it always did.
    for name, service in services.items():
        assert service.get("profiles", []) == (["kafka"] if name in KAFKA_PROFILE else []), name


def test_without_the_profile_nothing_waits_for_a_kafka_service(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        if name not in KAFKA_PROFILE:
            assert not set(service.get("depends_on", {})) & KAFKA_PROFILE, name


def test_the_lake_is_minio_with_its_bucket_made_before_adevents_starts(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in app_services(services).items():
        env = service["environment"]
        settings = Settings.from_env({k: str(v) for k, v in env.items()})
        assert settings.lake_uri == "s3://adevents/lake", name
        assert settings.aws_endpoint_url == "http://minio:9000" and settings.aws_allow_http, name
        # The secret comes from the environment of `docker compose`, never from the file.
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD"), name
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
        done = service["depends_on"]["minio-init"]["condition"]
        assert done == "service_completed_successfully", name
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing lake/adevents" in " ".join(init["command"])
    assert "lake:/minio" in services["minio"]["volumes"]


def test_every_service_has_a_health_check_and_a_restart_policy(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        assert service.get("restart") in RESTART_POLICIES, name
        test = service.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_every_command_is_a_real_command_of_this_version(
    services: dict[str, dict[str, Any]],
) -> None:
    expected = {"generator": "generate", "api": "serve", "scheduler": "scheduler"}
    expected.update({"consumer-0": "consume", "consumer-1": "consume"})
    expected.update({"generator-kafka": "generate", "ingest-kafka": "serve"})
    expected.update({f"consumer-kafka-{n}": "consume" for n in range(3)})
    for name, service in app_services(services).items():
        args = argv(service["command"])
        assert args[0] in ("adevents", "litestar"), name
        check_command(args)
        if args[0] == "adevents":
            assert args[1] == expected[name], name
    assert argv(services["redis"]["healthcheck"]["test"][1:])[:2] == ["redis-cli", "ping"]


def test_health_checks_run_real_code(services: dict[str, dict[str, Any]]) -> None:
    for name, service in app_services(services).items():
        test = service["healthcheck"]["test"]
        args = argv(test[1]) if test[0] == "CMD-SHELL" else argv(test[1:])
        check_command(args)
        assert args != argv(service["command"]), f"{name}: a health check must not start one"


def test_every_variable_is_a_known_setting_with_a_valid_value(
    services: dict[str, dict[str, Any]],
) -> None:
    known = {name for name, _, _ in Settings.describe()}
    for name, service in app_services(services).items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        unknown = set(env) - known
        assert not unknown, f"{name} sets variables adevents does not read: {sorted(unknown)}"
        settings = Settings.from_env({k: str(v) for k, v in env.items()})  # values parse
        assert settings.data_dir == "/data"
        assert settings.redis_url == "redis://redis:6379/0"


def test_services_share_the_data_volume_and_wait_for_redis(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    assert "data" in compose["volumes"]
    for name, service in app_services(services).items():
        assert "data:/data" in service["volumes"], name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
    # Redis as a key cache: never evicting, and restarting empty rather than half-restored.
    redis_args = argv(services["redis"]["command"])
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis_args[redis_args.index("--appendonly") + 1] == "no"
    assert redis_args[redis_args.index("--save") + 1] == ""


def test_redis_loads_the_module_its_image_builds(services: dict[str, dict[str, Any]]) -> None:
    """The compose Redis is built from redis_module/ and loads the .so that build installs;
    the build copies every file the Makefile compiles (no Docker engine here to run it)."""
    redis_service = services["redis"]
    context = ROOT / redis_service["build"]
    assert context == ROOT / "redis_module"
    dockerfile = (context / "Dockerfile").read_text()
    args = argv(redis_service["command"])
    loaded = args[args.index("--loadmodule") + 1]
    installed = re.search(r"^COPY --from=build /src/(\S+) (\S+)$", dockerfile, re.M)
    assert installed is not None and installed[2] == loaded
    copied = re.search(r"^COPY (.+) /src/$", dockerfile, re.M)
    assert copied is not None and "RUN make -C /src" in dockerfile
    makefile = (context / "Makefile").read_text()
    rule = re.search(r"^(\S+): (.+)$", makefile, re.M)
    assert rule is not None and installed[1] == rule[1]
    assert {"Makefile", *rule[2].split()} <= set(copied[1].split())
    assert all((context / name).is_file() for name in copied[1].split())


def test_api_is_published(services: dict[str, dict[str, Any]]) -> None:
    args = argv(services["api"]["command"])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = args[args.index("--port") + 1]
    assert f"{port}:{port}" in services["api"]["ports"]
    assert f":{port}/health" in " ".join(argv(services["api"]["healthcheck"]["test"][1:]))


# -- Prometheus and Grafana ------------------------------------------------------------------
def bind_mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> host path of the service's bind mounts (``./…:/…[:ro]``)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            found[PurePosixPath(target)] = ROOT / source
    return found


def host_path(service: dict[str, Any], inside: str) -> Path:
    """The host file or folder a container path of ``service`` is, through its bind mounts."""
    path = PurePosixPath(inside)
    for target, source in bind_mounts(service).items():
        if path == target or target in path.parents:
            return source.joinpath(*path.relative_to(target).parts)
    pytest.fail(f"{inside} is not in any bind mount of {service.get('image')}")


def flag(args: list[str], name: str) -> str:
    """The value of ``--name=value`` in ``args``."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, args)
    return values[0]


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> ``[host_ip:]host_port`` it is published on."""
    out = {}
    for mapping in service.get("ports", []):
        *host, container = str(mapping).split(":")
        out[int(container)] = ":".join(host)
    return out


def test_every_bind_mount_exists_in_the_repository(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts {source} (at {target}), which is missing"


def test_prometheus_scrapes_the_api_with_the_rules_mounted(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    args = argv(prometheus["command"])
    config_path = flag(args, "config.file")
    config = yaml.safe_load(host_path(prometheus, config_path).read_text())
    # Rule files resolve against the config file's folder, inside the container.
    for rule_file in config["rule_files"]:
        inside = PurePosixPath(config_path).parent / rule_file
        assert host_path(prometheus, str(inside)).is_file(), rule_file
    # Its TSDB is a named volume, not the container's writable layer.
    assert f"prometheus:{flag(args, 'storage.tsdb.path')}" in prometheus["volumes"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "adevents"]
    api_args = argv(services["api"]["command"])
    api_port = api_args[api_args.index("--port") + 1]
    assert job["static_configs"][0]["targets"] == [f"api:{api_port}"]
    from api.routes import metrics

    assert job.get("metrics_path", "/metrics") in metrics.paths
    assert "api" in prometheus["depends_on"]
    # No authentication: reachable from this host only.
    assert published(prometheus) == {9090: "127.0.0.1:9090"}
    assert "http://127.0.0.1:9090/-/ready" in prometheus["healthcheck"]["test"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    (source,) = [
        d
        for f in sorted((provisioning / "datasources").glob("*.yml"))
        for d in yaml.safe_load(f.read_text())["datasources"]
    ]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090" and 9090 in published(services["prometheus"])
    (provider,) = [
        p
        for f in sorted((provisioning / "dashboards").glob("*.yml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    dashboards = sorted(host_path(grafana, provider["options"]["path"]).glob("*.json"))
    assert [d.name for d in dashboards] == ["adevents.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == dashboards[0]
    # Every panel and query uses the provisioned data source (by uid, as Grafana resolves it).
    dashboard = json.loads(dashboards[0].read_text())
    queried = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert queried and all(p["targets"] for p in queried)
    for panel in queried:
        for used in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert used == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # The admin password comes from the environment of `docker compose`, never from the file.
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    assert published(grafana) == {3000: "3000"}
    assert "http://127.0.0.1:3000/api/health" in grafana["healthcheck"]["test"]


def test_monitoring_keeps_its_data_in_named_volumes(compose: dict[str, Any]) -> None:
    assert {"prometheus", "grafana"} <= set(compose["volumes"])
    assert "grafana:/var/lib/grafana" in compose["services"]["grafana"]["volumes"]


# -- Kafka (`--profile kafka`) -----------------------------------------------------------------
def listeners(text: str) -> dict[str, str]:
    """``NAME://host:port,NAME://host:port`` -> {NAME: "host:port"}."""
    return dict(item.split("://", 1) for item in text.split(","))


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


def settings_of(service: dict[str, Any]) -> Settings:
    return Settings.from_env({k: str(v) for k, v in service["environment"].items()})


def kafka_users(services: dict[str, dict[str, Any]]) -> dict[str, Settings]:
    """The adevents services that talk to Kafka, with their settings."""
    found = {n: settings_of(s) for n, s in app_services(services).items()}
    return {n: s for n, s in found.items() if s.kafka.kafka_bootstrap_servers}


def kafka_consumers(services: dict[str, dict[str, Any]]) -> dict[str, Settings]:
    return {
        name: settings
        for name, settings in kafka_users(services).items()
        if argv(services[name]["command"])[1] == "consume" and settings.consumer_source == "kafka"
    }


def broker_address(services: dict[str, dict[str, Any]]) -> str:
    """host:port the other services reach the broker at: its advertised PLAINTEXT listener."""
    env = services["kafka"]["environment"]
    return listeners(env["KAFKA_ADVERTISED_LISTENERS"])["PLAINTEXT"]


def test_the_broker_is_one_pinned_kraft_node_on_a_named_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"]), kafka["image"]
    assert services["kafka-init"]["image"] == kafka["image"]
    env = {k: str(v) for k, v in kafka["environment"].items()}
    # KRaft: broker and controller in one process, the only voter of its quorum.
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    bound = listeners(env["KAFKA_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == (
        f"{env['KAFKA_NODE_ID']}@localhost:{port_of(bound[controller])}"
    )
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])  # a base64 UUID, fixed
    # Every listener speaks PLAINTEXT; the services' one is advertised under the service's name.
    protocols = dict(
        pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(protocols) == set(bound) and set(protocols.values()) == {"PLAINTEXT"}
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert controller not in advertised and set(advertised) <= set(bound)
    for name, address in advertised.items():
        assert port_of(address) == port_of(bound[name]), name
    assert advertised["PLAINTEXT"] == f"kafka:{port_of(bound['PLAINTEXT'])}"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    # One node: the group coordinator's offsets topic (and the transaction log) can have one
    # replica only, or the consumer group never forms.
    for key in ("OFFSETS_TOPIC_REPLICATION_FACTOR", "TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[f"KAFKA_{key}"] == "1", key
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    # Its log survives a restart of the container.
    assert "kafka" in compose["volumes"]
    assert f"kafka:{env['KAFKA_LOG_DIRS']}" in kafka["volumes"]
    # No authentication: published on this host's loopback only, as the listener advertised
    # to tools there.
    ports = published(kafka)
    assert ports and all(host.startswith("127.0.0.1:") for host in ports.values())
    for container, host in ports.items():
        assert host == f"127.0.0.1:{container}"
        assert host in advertised.values() and port_of(host) != port_of(advertised["PLAINTEXT"])
    assert kafka["restart"] == "unless-stopped"
    test = argv(kafka["healthcheck"]["test"][1:])
    assert test[0] == "/opt/kafka/bin/kafka-broker-api-versions.sh"
    assert test[test.index("--bootstrap-server") + 1] == f"localhost:{port_of(bound['PLAINTEXT'])}"


def test_the_topic_is_made_with_its_partitions_before_anything_uses_it(
    services: dict[str, dict[str, Any]],
) -> None:
    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert argv(init["entrypoint"]) == ["/opt/kafka/bin/kafka-topics.sh"]
    args = argv(init["command"])
    value = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert "--create" in args and "--if-not-exists" in args  # a restart is no error
    assert value["--bootstrap-server"] == broker_address(services)
    assert value["--replication-factor"] == "1"
    # The partitions KAFKA_NUM_PARTITIONS gives a topic made on first use, and more than the
    # group has members (a member beyond the partitions would have none).
    partitions = int(value["--partitions"])
    assert str(partitions) == str(services["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"])
    assert partitions > len(kafka_consumers(services))
    users = kafka_users(services)
    assert set(users) == KAFKA_PROFILE - OTHERS  # the default services never talk to Kafka
    for name, settings in users.items():
        assert settings.kafka.kafka_topic == value["--topic"], name
        assert settings.kafka.kafka_bootstrap_servers == broker_address(services), name
        assert settings.kafka.kafka_security_protocol == "PLAINTEXT", name
        waits = services[name]["depends_on"]
        assert waits["kafka"]["condition"] == "service_healthy", name
        assert waits["kafka-init"]["condition"] == "service_completed_successfully", name
    assert "--kafka" in argv(services["generator-kafka"]["command"])


def test_kafka_consumers_are_one_group_each_on_a_slot_of_its_own(
    services: dict[str, dict[str, Any]],
) -> None:
    consumers = kafka_consumers(services)
    assert set(consumers) == {f"consumer-kafka-{n}" for n in range(3)}
    # One group: the same group id and topic, so the same Delta app ids for every partition.
    assert len({(s.kafka.kafka_group_id, s.kafka.kafka_topic) for s in consumers.values()}) == 1
    # The spool's consumers stay on the spool.
    assert settings_of(services["consumer-0"]).consumer_source == "spool"
    assert settings_of(services["consumer-1"]).consumer_source == "spool"
    # Every consumer shares the one data volume, so each needs a CONSUMER_SLOT of its own (and
    # Redis, under which slots are shared): one service each, never `deploy.replicas`, whose
    # copies would all start on one slot.
    every = {
        n: settings_of(s)
        for n, s in app_services(services).items()
        if argv(s["command"])[1] == "consume"
    }
    slots = [s.consumer_slot for s in every.values()]
    assert len(set(slots)) == len(slots), slots
    for name, settings in consumers.items():
        assert "deploy" not in services[name], name
        assert settings.redis_url, name
    # Names of their own: the ledger's, and the status file the health check reads.
    names = [s.consumer_name for s in consumers.values()]
    assert all(names) and len(set(names)) == len(names)


def test_the_kafka_ingest_publishes_to_the_topic_on_a_port_of_its_own(
    services: dict[str, dict[str, Any]],
) -> None:
    ingest = services["ingest-kafka"]
    assert settings_of(ingest).ingest.ingest_sink == "kafka"
    assert settings_of(services["api"]).ingest.ingest_sink == "spool"
    args = argv(ingest["command"])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = args[args.index("--port") + 1]
    assert list(published(ingest)) == [int(port)]
    assert not set(published(ingest).values()) & set(published(services["api"]).values())
    assert f":{port}/health" in " ".join(argv(ingest["healthcheck"]["test"][1:]))


def health_check(
    service: dict[str, Any], tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``service``'s ``python -c`` health check here, in its environment with ``env``
    instead (DATA_DIR under tmp_path)."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    merged = {k: str(v) for k, v in service["environment"].items()}
    merged.update(DATA_DIR=str(tmp_path), **env)
    # Nothing of adevents' own from this process's environment: the service's alone counts.
    known = {name for name, _, _ in Settings.describe()}
    base = {k: v for k, v in os.environ.items() if k not in known}
    return subprocess.run(
        [sys.executable, "-c", test[3]],
        cwd=ROOT,
        env={**base, **merged},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listening, for the block)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_the_kafka_generator_health_check_asks_the_broker(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    generator = services["generator-kafka"]
    topic = settings_of(generator).kafka.kafka_topic
    with MockCluster(brokers=1) as cluster:
        cluster.create_topic(topic)
        done = health_check(generator, tmp_path, KAFKA_BOOTSTRAP_SERVERS=cluster.bootstrap)
        assert done.returncode == 0, done.stderr
    # Nobody listening: the metadata request times out and the check fails.
    with closed_port() as port:
        done = health_check(generator, tmp_path, KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}")
    assert done.returncode != 0


@pytest.mark.parametrize(
    ("statuses", "healthy"),
    [
        pytest.param([], False, id="no-status-yet"),
        pytest.param([("self", "running", 0, 10)], True, id="running"),
        pytest.param([("self", "retrying", 0, 10)], False, id="retrying"),
        pytest.param([("self", "running", 60, 10)], False, id="stale"),
        pytest.param([("self", "running", 0, 10**9)], False, id="lagging"),
        pytest.param(
            [("self", "running", 0, 10), ("other", "running", 0, 10**9)], True, id="other-lags"
        ),
        pytest.param([("other", "running", 0, 10)], False, id="only-another-member"),
    ],
)
def test_the_kafka_consumer_health_check_reads_its_own_status(
    services: dict[str, dict[str, Any]],
    tmp_path: Path,
    redis_url: str,
    statuses: list[tuple[str, State, float, int]],
    healthy: bool,
) -> None:
    """Healthy while Redis answers and this member's status (by CONSUMER_NAME) is fresh and
    running, with none of its partitions past ALERT_KAFKA_LAG_CRITICAL."""
    consumer = services["consumer-kafka-1"]
    settings = settings_of(consumer)
    assert settings.jobs.alert_kafka_lag_critical < 10**9
    now = time.time()
    for n, (who, state, age, lag) in enumerate(statuses):
        name = settings.consumer_name if who == "self" else "consumer-kafka-9"
        write_status(
            Layout(str(tmp_path)).state,
            ConsumerStatus(
                name=name,
                pid=1,
                state=state,
                since=now - age,
                updated_at=now - age,
                kafka_lag={f"{settings.kafka.kafka_topic}/{n}": lag},
            ),
        )
    done = health_check(consumer, tmp_path, REDIS_URL=redis_url)
    assert (done.returncode == 0) == healthy, done.stderr


# -- Dockerfile --------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_is_slim_and_non_root() -> None:
    steps = dockerfile()
    bases = [args for ins, args in steps if ins == "FROM"]
    assert bases and all(re.match(r"python:3\.1[1-9][\w.-]*-slim", b.split()[0]) for b in bases)
    users = [(i, args) for i, (ins, args) in enumerate(steps) if ins == "USER"]
    assert users, "the image must not run as root"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    # Nothing runs as root after the switch, and the switch precedes the command.
    assert all(ins != "RUN" for ins, _ in steps[last_user_at:])
    assert last_user_at < max(i for i, (ins, _) in enumerate(steps) if ins == "CMD")


def pip_installs() -> list[tuple[int, list[str]]]:
    """(step index, argv) of every ``pip install`` the Dockerfile runs, ``&&`` chains split."""
    found = []
    for i, (ins, args) in enumerate(dockerfile()):
        if ins != "RUN":
            continue
        command: list[str] = []
        for word in [*shlex.split(args), "&&"]:
            if word not in ("&&", ";"):
                command.append(word)
                continue
            if command[:2] == ["pip", "install"] or command[1:3] == ["-m", "pip"]:
                found.append((i, command))
            command = []
    return found


def test_dockerfile_caches_dependencies_apart_from_the_code() -> None:
    steps = dockerfile()
    copies = [(i, args.split()) for i, (ins, args) in enumerate(steps) if ins == "COPY"]
    lock_at = next(i for i, args in copies if RUNTIME_LOCK in args[:-1])
    code_at = min(i for i, args in copies if {"pipeline", ".", "api"} & set(args[:-1]))
    installs = [i for i, command in pip_installs() if "--no-deps" not in command]
    assert lock_at < code_at, "the lock must be copied before the code"
    assert installs and lock_at < installs[0] < code_at, "dependencies install first"
    code_installs = [i for i, command in pip_installs() if "--no-deps" in command]
    assert code_installs and code_installs[0] > code_at


def test_dockerfile_installs_the_runtime_lock_with_hashes() -> None:
    """The image gets exactly the locked versions (those the tests ran on), each file's hash
    checked; the code's own install adds nothing unlocked."""
    installs = pip_installs()
    assert installs
    for _, command in installs:
        if "--no-deps" in command:
            continue
        assert "--require-hashes" in command, shlex.join(command)
        assert command[command.index("-r") + 1] == RUNTIME_LOCK, shlex.join(command)
    assert any("--no-deps" not in command for _, command in installs)
    assert "--hash=sha256:" in (ROOT / RUNTIME_LOCK).read_text()


def test_dockerfile_copies_what_the_compiled_part_is_built_from() -> None:
    """The image builds the package's C extension (``[[tool.setuptools.ext-modules]]``): every
    source and header it names is copied into the image (a header in the Redis module's
    directory too), a compiler is installed for the build and removed in the same step, and
    .dockerignore keeps none of them out."""
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "ext-modules"
    ]
    needed = {PurePosixPath(f) for m in modules for f in [*m["sources"], *m.get("depends", [])]}
    assert needed
    copied = set()
    for ins, args in dockerfile():
        if ins == "COPY" and not args.startswith("--from"):
            copied |= {PurePosixPath(a) for a in args.split()[:-1]}
    assert all(any(f == c or c in f.parents for c in copied) for f in needed), needed - copied
    install = next(command for _, command in pip_installs() if "--no-deps" in command)
    step = next(args for ins, args in dockerfile() if ins == "RUN" and shlex.join(install) in args)
    assert "apt-get install" in step and "gcc" in step and "apt-get purge" in step
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not {str(f) for f in needed} & ignored and "redis_module" not in ignored


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "ad_event_data"} <= ignored
    needed = {"pyproject.toml", "README.md", "requirements", RUNTIME_LOCK}  # the build needs them
    assert not needed & ignored
