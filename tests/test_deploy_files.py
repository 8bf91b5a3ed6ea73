"""The files in deploy/: Flower images pinned to the project's Flower version, every
command-line flag accepted by the program that receives it (as its ``--help`` lists them), and
the ports, mounts and node config consistent between the services."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.common.config import parse_config_args
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
FLWR_VERSION = version("flwr")
FLOWER_PROGRAMS = {"superlink": "flower-superlink", "supernode": "flower-supernode"}
FEDCT_IMAGE = "fedct-superexec"
NGINX_IMAGE = "nginx"


@dataclass(frozen=True)
class Container:
    """One process a deployment file starts: where, which image, its command line, and the
    files and folders mounted into it."""

    where: str
    image: str
    program: str
    argv: list[str]
    files: frozenset[str]
    folders: frozenset[str]

    def mounted(self, path: str) -> bool:
        return path in self.files or any(
            path == folder or path.startswith(f"{folder}/") for folder in self.folders
        )


def dockerfile() -> dict[str, str]:
    """The Dockerfile's FROM image (ARG defaults substituted) and ENTRYPOINT program."""
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    base = re.search(r"^FROM (\S+)$", text, re.MULTILINE)
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert base and entrypoint, "deploy/Dockerfile needs a FROM and an exec-form ENTRYPOINT"
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.group(1))
    return {"from": image, "entrypoint": yaml.safe_load(entrypoint.group(1))[0]}


def default_program(image: str) -> str:
    """The entrypoint of an image the deployment uses."""
    name, _, _ = image.partition(":")
    if name.rpartition("/")[2] == FEDCT_IMAGE:
        return dockerfile()["entrypoint"]
    if name == NGINX_IMAGE:
        return "nginx"
    flower = re.fullmatch(r"flwr/(\w+)", name)
    assert flower and flower.group(1) in FLOWER_PROGRAMS, f"unexpected image {image}"
    return FLOWER_PROGRAMS[flower.group(1)]


def compose_files() -> list[Path]:
    return sorted(DEPLOY.glob("*/compose.yaml"))


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, document)
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document and document.get("kind") != "Kustomization"
    ]


def volume_target(volume: str) -> tuple[str, str]:
    """(container path, mode) of a compose volume ``SOURCE:TARGET[:MODE]``; SOURCE may hold
    ``${VAR:?message}``."""
    match = re.search(r":(/[^:]+)(?::(\w+))?$", volume)
    assert match, f"cannot read the volume {volume!r}"
    return match.group(1), match.group(2) or "rw"


def compose_containers() -> list[Container]:
    containers = []
    for path in compose_files():
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            entrypoint = service.get("entrypoint") or [default_program(service["image"])]
            containers.append(
                Container(
                    f"{path.relative_to(ROOT)}:{name}",
                    service["image"],
                    entrypoint[0],
                    [*entrypoint[1:], *service.get("command", [])],
                    frozenset(secret["target"] for secret in service.get("secrets", [])),
                    frozenset(volume_target(v)[0] for v in service.get("volumes", [])),
                )
            )
    return containers


def generated_secrets() -> dict[str, list[str]]:
    """Secret name → its keys, from the kustomization's secretGenerator."""
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    return {
        generator["name"]: [Path(file).name for file in generator["files"]]
        for generator in kustomization["secretGenerator"]
    }


def k8s_mounts(pod: dict[str, Any], container: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(files, folders) mounted into a container; a Secret's files are its items, or all of
    its generated keys."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    files, folders = set(), set()
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            folders.add(mount["mountPath"])
            continue
        keys = [item["path"] for item in secret.get("items", [])]
        files |= {
            f"{mount['mountPath']}/{key}"
            for key in keys or generated_secrets()[secret["secretName"]]
        }
    return files, folders


def k8s_containers() -> list[Container]:
    containers = []
    for path, document in k8s_documents():
        pod = document.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            command = container.get("command") or [default_program(container["image"])]
            files, folders = k8s_mounts(pod, container)
            containers.append(
                Container(
                    f"{path.relative_to(ROOT)}:{container['name']}",
                    container["image"],
                    command[0],
                    [*command[1:], *container.get("args", [])],
                    frozenset(files),
                    frozenset(folders),
                )
            )
    return containers


ALL_CONTAINERS = compose_containers() + k8s_containers()


@cache
def accepted_flags(program: str, subcommand: tuple[str, ...]) -> frozenset[str]:
    """The flags that ``program SUBCOMMAND --help`` of this environment lists."""
    done = subprocess.run(
        [str(BIN / program), *subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", done.stdout))


def flags(argv: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]


def test_flower_images_carry_the_pinned_flower_version() -> None:
    (requirement,) = [
        Requirement(spec)
        for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if Requirement(spec).name == "flwr"
    ]
    assert FLWR_VERSION in requirement.specifier
    images = {c.image for c in ALL_CONTAINERS} | {dockerfile()["from"]}
    flower = {image for image in images if image.startswith("flwr/")}
    # Hospitals run their SuperNode from the fedct image: `fedct site supernode`.
    assert flower == {f"flwr/{name}:{FLWR_VERSION}" for name in ("superlink", "superexec")}
    assert "flwr==${FLWR_VERSION}" in (DEPLOY / "Dockerfile").read_text()
    for image in images - flower:
        name, _, tag = image.partition(":")
        assert name.rpartition("/")[2] == FEDCT_IMAGE or (name == NGINX_IMAGE and tag), image


@pytest.mark.parametrize("container", ALL_CONTAINERS, ids=lambda c: c.where)
def test_every_flag_is_accepted_by_the_program(container: Container) -> None:
    used = flags(container.argv)
    if container.program == "fedct" and container.argv[:2] == ["site", "supernode"]:
        # fedct's options, then flower-supernode's after "--".
        split = container.argv.index("--")
        own, flower = flags(container.argv[2:split]), flags(container.argv[split + 1 :])
        assert not set(own) - accepted_flags("fedct", ("site", "supernode")), container.where
        unknown = set(flower) - accepted_flags("flower-supernode", ())
        assert not unknown, f"{container.where}: flower-supernode does not accept {unknown}"
        return
    if container.program == "fedct":
        subcommand = tuple(container.argv[: container.argv.index(used[0])])
        assert subcommand == ("registry", "serve")
    elif container.program.startswith("flower-"):
        subcommand = ()
        assert not container.argv or container.argv[0].startswith("--"), container.argv
    else:
        assert not used, f"{container.program} is not a program whose flags this test knows"
        return
    unknown = set(used) - accepted_flags(container.program, subcommand)
    assert not unknown, f"{container.where}: {container.program} does not accept {unknown}"


@pytest.mark.parametrize("container", ALL_CONTAINERS, ids=lambda c: c.where)
def test_every_path_on_a_command_line_is_mounted(container: Container) -> None:
    paths = [arg for arg in container.argv if arg.startswith("/")]
    missing = [path for path in paths if not container.mounted(path)]
    assert not missing, f"{container.where}: nothing mounted at {missing}"


def test_readme_flags_are_accepted() -> None:
    """Every ``flower-*`` command line in the README's shell blocks."""
    text = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.DOTALL)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [
        shlex.split(line)
        for line in lines
        if line.strip().startswith(("flower-", "fedct site supernode"))
    ]
    # `fedct site supernode ... -- ARGS` runs flower-supernode ARGS.
    commands = [
        ["flower-supernode", *argv[argv.index("--") + 1 :]] if argv[0] == "fedct" else argv
        for argv in commands
    ]
    assert {argv[0] for argv in commands} >= {"flower-superlink", "flower-supernode"}
    for argv in commands:
        unknown = set(flags(argv[1:])) - accepted_flags(argv[0], ())
        assert not unknown, f"README: {argv[0]} does not accept {unknown}"


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_everything_meets_the_superlink_on_port_8000() -> None:
    for container in ALL_CONTAINERS:
        argv = container.argv
        if container.program == "flower-superlink":
            assert option(argv, "--port") == "8000" and option(argv, "--host") == "0.0.0.0"
            assert "--enable-supernode-auth" in argv and "--insecure" not in argv
            assert option(argv, "--isolation") == "process"
        if "--superlink" in argv:
            assert option(argv, "--superlink").endswith(":8000"), container.where
            assert "--root-certificates" in argv and "--auth-supernode-private-key" in argv
        if container.program == "flower-superexec":
            address = option(argv, "--runtime-api-address")
            if address.startswith("superlink:"):
                assert address == "superlink:8000", container.where
                assert "--root-certificates" in argv and "--insecure" not in argv
            else:
                assert address.startswith("supernode:"), container.where
        if container.program.startswith("flower-"):
            assert "--superexec-auth-secret-file" in argv, container.where
    # Only the proxy publishes ports: the SuperLink is reached through it (docs/threat-model.md).
    coordinator = yaml.safe_load((DEPLOY / "coordinator" / "compose.yaml").read_text())
    assert "ports" not in coordinator["services"]["superlink"]
    assert coordinator["services"]["proxy"]["ports"] == ["8000:8000", "8001:8001"]


def test_the_clientapp_sees_the_paths_of_the_node_config() -> None:
    """The ClientApp runs in the SuperExec container: the cache (read-only), the audit log and
    the FedBN state named in the SuperNode's node config must be mounted there."""
    hospital = yaml.safe_load((DEPLOY / "hospital" / "compose.yaml").read_text())["services"]
    node_config = parse_config_args([option(hospital["supernode"]["command"], "--node-config")])
    mounts = dict(volume_target(v) for v in hospital["superexec-clientapp"]["volumes"])
    assert mounts[node_config["data-path"]] == "ro"
    assert mounts[str(Path(node_config["audit-log"]).parent)] == "rw"
    assert mounts[node_config["state-dir"]] == "rw"
    assert node_config["site"].startswith("${SITE")
    assert option(hospital["superexec-clientapp"]["command"], "--runtime-api-address") == (
        f"supernode:{option(hospital['supernode']['command'], '--port')}"
    )


@pytest.mark.parametrize("where", ["coordinator:proxy", "operator:forwarder"])
def test_the_nginx_templates_get_every_variable_and_file(where: str) -> None:
    """The official nginx image renders /etc/nginx/templates/*.template with the service's
    environment: every variable must be set, every file it names mounted."""
    folder, name = where.split(":")
    service = yaml.safe_load((DEPLOY / folder / "compose.yaml").read_text())["services"][name]
    (volume,) = service["volumes"]
    source, target, mode = volume.split(":")
    template = DEPLOY / folder / source
    assert (target, mode) == (f"/etc/nginx/templates/{template.name}", "ro")
    text = template.read_text()
    assert set(re.findall(r"\$\{([A-Z_]+)\}", text)) == set(service["environment"])
    certs = service["environment"]["CERTS"]
    files = {f"{certs}/{file}" for file in re.findall(r"\$\{CERTS\}/([\w.]+);", text)}
    assert files == {secret["target"] for secret in service["secrets"]}
