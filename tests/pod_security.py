"""The Pod Security Standards' "restricted" level (which includes "baseline"), checked over a pod spec the
way the PodSecurity admission controller does (Kubernetes 1.32 rules, k8s.io/pod-security-admission).
kubernetes-validate checks schemas only; this checks the policy. Plus one rule of ours that the
standard leaves out: a read-only root filesystem in every container."""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", [])]


def violations(pod: dict[str, Any], metadata: dict[str, Any] | None = None) -> list[str]:
    """Every rule of the restricted level this pod spec breaks, one line each (empty: admitted)."""
    found: list[str] = []
    psc = pod.get("securityContext") or {}
    annotations = (metadata or {}).get("annotations") or {}
    # --- baseline ---
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            found.append(f"pod: {host}")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if "hostPath" in kinds:
            found.append(f"volume {v['name']}: hostPath")
        if not kinds <= RESTRICTED_VOLUMES:  # restricted
            found.append(f"volume {v['name']}: type {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value == "unconfined":
            found.append(f"annotation {key}: unconfined")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        found.append("pod: AppArmor Unconfined")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("pod: hostProcess")
    found += _selinux("pod", psc)
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            found.append(f"pod: sysctl {s['name']}")
    # --- restricted, pod level ---
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"pod: seccompProfile {pod_seccomp}")
    if psc.get("runAsUser") == 0:
        found.append("pod: runAsUser 0")
    for c in containers(pod):
        name = f"container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{name}: hostProcess")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"{name}: AppArmor Unconfined")
        found += _selinux(name, sc)
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {sc['procMount']}")
        caps = sc.get("capabilities") or {}
        if set(caps.get("add", [])) - BASELINE_CAPABILITIES:
            found.append(f"{name}: adds capabilities {sorted(set(caps['add']) - BASELINE_CAPABILITIES)}")
        # --- restricted ---
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in caps.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities beyond NET_BIND_SERVICE")
        if sc.get("runAsNonRoot") is False or not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp or 'unset'}")
        # --- ours ---
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: root filesystem is writable")
    return found


def _selinux(where: str, sc: dict[str, Any]) -> list[str]:
    options = sc.get("seLinuxOptions") or {}
    found = []
    if options.get("type", "") not in SELINUX_TYPES:
        found.append(f"{where}: SELinux type {options['type']}")
    if options.get("user") or options.get("role"):
        found.append(f"{where}: SELinux user or role set")
    return found
