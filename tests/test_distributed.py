"""Several ranks under torchrun (gloo, CPU): sharded output equals unsharded, probes, failure, shutdown."""

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from presets.tools.tiny_checkpoint import write_checkpoint
from tests.conftest import TINY
from tests.launch import finish, free_port, get, post, running, server_cmd, start, wait_healthy
from tests.test_api import KAITO_CHATS, KAITO_GENERATE

SEQ = ["--max_seq_len", "128", "--max_batch_size", "4"]  # as the in-process reference clients
GREEDY = {"temperature": 0, "max_gen_len": 12}


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """The same weights as tiny_ckpt (same shape and seed), split over 2 model-parallel shards."""
    return write_checkpoint(str(tmp_path_factory.mktemp("two")), TINY, shards=2)


def greedy_bodies():
    params = {**GREEDY, "ignore_eos": True}
    return [{"prompts": [f"The river flows past mill {i}" + " and on" * i], "parameters": params} for i in range(8)]


def concurrently(fn, args_list):
    out = [None] * len(args_list)
    threads = [threading.Thread(target=lambda i=i, a=a: out.__setitem__(i, fn(*a))) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_ranks_equal_one_rank_completion_with_idle_past_timeout(two_shards, completion_client):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A timeout short enough to idle past, long enough for a loaded machine: it bounds every wait of a rank for
    # the other, from joining the process group (the ranks start Python and torch side by side, one may be
    # seconds behind) to each step's collectives.
    flags = [*SEQ, "--dist_timeout", "6"]
    proc = start(server_cmd("completion", two_shards, port, *flags, torchrun=["--nproc_per_node", "2"]), "completion")
    with running(proc):
        wait_healthy(proc, url)
        expected = completion_client.post("/generate", json=KAITO_GENERATE | {"parameters": GREEDY}).get_json()
        assert post(f"{url}/generate", KAITO_GENERATE | {"parameters": GREEDY}) == (200, expected)
        bodies = greedy_bodies()
        one_rank = [completion_client.post("/generate", json=b).get_json() for b in bodies]
        assert concurrently(lambda b: post(f"{url}/generate", b)[1], [(b,) for b in bodies]) == one_rank
        time.sleep(8)  # idle longer than the process group's 6 s timeout
        assert get(f"{url}/healthz") == (200, {"status": "Healthy"})
        assert post(f"{url}/generate", bodies[3]) == (200, one_rank[3])
        assert post(f"{url}/shutdown", None) == (200, {})
        code, out = finish(proc)
    assert code == 0, out  # torchrun exits 0 only when every rank did
    assert "rank 1: rank 0 asked to exit" in out


def test_two_ranks_serve_in_bf16(two_shards):
    """bf16 (what --dtype auto is on CPUs with AVX512-BF16 or AMX) on 2 ranks: gloo reduces the bf16 partial sums
    of the row-parallel layers, 8 concurrent requests each get their 12 tokens. (Not compared with one rank:
    two rounded partial sums are not one rounded sum, so near-ties of random weights may go either way.)"""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [*SEQ, "--dtype", "bfloat16"]
    proc = start(server_cmd("completion", two_shards, port, *flags, torchrun=["--nproc_per_node", "2"]), "completion")
    with running(proc):
        wait_healthy(proc, url)
        bodies = [
            {"prompt": b["prompts"][0], "max_tokens": 12, "temperature": 0, "ignore_eos": True} for b in greedy_bodies()
        ]
        answers = concurrently(lambda b: post(f"{url}/v1/completions", b), [(b,) for b in bodies])
        assert [(code, a["usage"]["completion_tokens"]) for code, a in answers] == [(200, 12)] * len(bodies)
        assert post(f"{url}/shutdown", None) == (200, {})
        code, out = finish(proc)
    assert code == 0, out
    assert "rank 0: cpu, bfloat16" in out and "rank 1: cpu, bfloat16" in out


def test_two_ranks_with_prefix_hits_chunks_and_preemption_equal_one_rank(two_shards, completion_client):
    """8 KV blocks per rank (two of these sequences at a time), 8-token steps, prefix caching: every
    feature of the paged cache is active, and each rank runs the same plans."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A rank holds half the KV heads: 512 bytes a token, 8 KiB a block of 16.
    flags = [*SEQ[:2], "--max_batch_size", "8", "--kv_cache_memory", "64KiB", "--max_num_batched_tokens", "8"]
    proc = start(server_cmd("completion", two_shards, port, *flags, torchrun=["--nproc_per_node", "2"]), "completion")
    with running(proc):
        wait_healthy(proc, url)
        system = "The old mill by the river grinds wheat for the whole valley, day and night. "
        params = {"temperature": 0, "max_gen_len": 24, "ignore_eos": True}
        bodies = [{"prompts": [system + f"Question {i}: why?"], "parameters": params} for i in range(8)]
        one_rank = [completion_client.post("/generate", json=b).get_json() for b in bodies]
        assert post(f"{url}/generate", bodies[0]) == (200, one_rank[0])  # its prefix is cached from here on
        assert concurrently(lambda b: post(f"{url}/generate", b), [(b,) for b in bodies]) == [
            (200, r) for r in one_rank
        ]
        status, text = call_text(f"{url}/metrics")
        values = {k: float(v) for k, v in re.findall(r"^(vllm:\w+) (\S+)$", text, re.M)}
        assert values["vllm:prefix_cache_hits_total"] > 0 and values["vllm:num_preemptions_total"] > 0, values
        assert post(f"{url}/shutdown", None) == (200, {})
        code, out = finish(proc)
    assert code == 0, out
    assert out.count("KV cache: 8 blocks of 16 tokens = 128 tokens") == 2, out  # each rank's pool


def call_text(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def test_two_ranks_equal_one_rank_chat(two_shards, chat_client):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(server_cmd("chat", two_shards, port, *SEQ, torchrun=["--nproc_per_node", "2"]), "chat")
    with running(proc):
        wait_healthy(proc, url)
        bodies = [{"input_data": {**s["input_data"], "parameters": GREEDY}} for s in KAITO_CHATS]
        expected = [chat_client.post("/chat", json=b).get_json() for b in bodies]
        assert concurrently(lambda b: post(f"{url}/chat", b), [(b,) for b in bodies]) == [(200, e) for e in expected]
        assert post(f"{url}/shutdown", None) == (200, {})
        code, out = finish(proc)
    assert code == 0, out


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry))
        except OSError:
            continue
    return kids


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's child process that runs `rank`."""
    for pid in children(torchrun_pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        if env.get(b"RANK") == str(rank).encode():
            return pid
    raise AssertionError(f"no rank {rank} under pid {torchrun_pid}")


def descendants(pid: int) -> list[int]:
    return [pid] + [d for kid in children(pid) for d in descendants(kid)]


FAIL_BOUND_S = 15  # a dead rank stops the whole job within this many seconds


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "sigterm"])
def test_killed_worker_makes_master_fail_fast(two_shards, two_hosts, sig):
    """Two nodes, so only our failure handling acts (on one node torchrun itself stops the other ranks).
    SIGTERM on the worker node (its pod is going away) stops the job as fast and as loudly as a kill."""
    procs, ports = start_nodes(two_shards, two_hosts, "static", [*SEQ, "--dist_timeout", "8"])
    url, ns = f"http://{two_hosts[0]['ip']}:{ports[0]}", two_hosts[0]["netns"]
    with running(*procs):
        for proc, port, host in zip(procs, ports, two_hosts):
            wait_healthy(proc, f"http://{host['ip']}:{port}", host["netns"])
        long = {"prompts": ["x"] * 4, "parameters": {"temperature": 0, "max_gen_len": 120, "ignore_eos": True}}
        answers = []
        in_flight = threading.Thread(target=lambda: answers.append(post(f"{url}/generate", long, ns, FAIL_BOUND_S)))
        in_flight.start()
        time.sleep(0.3)
        killed_at = time.time()
        os.kill(rank_pid(procs[1].pid, 1), sig)  # the worker rank on node 1
        in_flight.join()
        status, body = answers[0]
        assert status == 503 and "failed" in body["detail"], body  # the in-flight request: 503, no hang
        health = get(f"{url}/healthz", ns)
        assert health[0] == 503 and "failed" in health[1]["detail"], health
        code, out = finish(procs[0], timeout=FAIL_BOUND_S)
        assert code != 0, out
        print(f"rank 0's node stopped {time.time() - killed_at:.1f}s after the kill")  # reported in the README
        assert time.time() - killed_at < FAIL_BOUND_S
        if sig == signal.SIGTERM:
            worker_code, worker_out = finish(procs[1], timeout=FAIL_BOUND_S)
            assert worker_code != 0 and "SIGTERM on a worker node: stopping the job" in worker_out, worker_out


def test_dead_rank_0_process_stops_the_job(two_shards):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(server_cmd("completion", two_shards, port, *SEQ, torchrun=["--nproc_per_node", "2"]), "completion")
    with running(proc):
        wait_healthy(proc, url)
        killed_at = time.time()
        os.kill(rank_pid(proc.pid, 0), signal.SIGKILL)  # the HTTP server and engine of the job, e.g. by the OOM killer
        code, out = finish(proc, timeout=FAIL_BOUND_S)
        assert code != 0 and "rank 1 failed" in out, out
        assert time.time() - killed_at < FAIL_BOUND_S


# -- two nodes: two torchrun processes, each in its own network namespace --------------------------

NODE_IPS = ("10.211.0.1", "10.211.0.2")


@pytest.fixture(scope="module")
def two_hosts():
    """Two network namespaces joined by a veth pair, each its own host; localhost when that is impossible."""
    tag = str(os.getpid() % 100000)
    ns, veth = [f"presets{tag}n{i}" for i in range(2)], [f"pv{tag}x{i}" for i in range(2)]
    cmds = [
        ["ip", "netns", "add", ns[0]],
        ["ip", "netns", "add", ns[1]],
        ["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]],
    ]
    for i in range(2):
        cmds += [
            ["ip", "link", "set", veth[i], "netns", ns[i]],
            ["ip", "-n", ns[i], "addr", "add", f"{NODE_IPS[i]}/24", "dev", veth[i]],
            ["ip", "-n", ns[i], "link", "set", veth[i], "up"],
            ["ip", "-n", ns[i], "link", "set", "lo", "up"],
        ]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        hosts = [{"netns": ns[i], "ip": NODE_IPS[i], "env": {"GLOO_SOCKET_IFNAME": veth[i]}} for i in range(2)]
    except (OSError, subprocess.CalledProcessError) as e:
        if os.environ.get("CI") == "true":  # CI runs as root: two real hosts there, never a silent fallback
            pytest.fail(f"network namespaces unavailable under CI: {e}")
        print(f"network namespaces unavailable ({e}); the two nodes share localhost")
        hosts = [{"netns": None, "ip": "127.0.0.1", "env": {}} for _ in range(2)]
    yield hosts
    for n in ns:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


def start_nodes(shards: str, hosts, form: str, flags: list[str]) -> tuple[list, list[int]]:
    """A completion server on each host (a torchrun node of `form`): (processes, each node's pod port)."""
    shared = hosts[0]["netns"] is None
    ports = [free_port(), free_port()] if shared else [5000, 5000]
    rdzv_port = free_port() if shared else 29500
    procs = []
    for node, host in enumerate(hosts):
        torchrun = node_flags(form, hosts, node, rdzv_port)
        cmd = server_cmd("completion", shards, ports[node], *flags, host=host["ip"], torchrun=torchrun)
        procs.append(start(cmd, "completion", host["netns"], host["env"]))
    return procs, ports


def node_flags(form: str, hosts, node: int, rdzv_port: int) -> list[str]:
    if form == "static":
        return [
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            hosts[0]["ip"],
            "--master_port",
            str(rdzv_port),
        ]
    flags = [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--max_restarts",
        "3",
        "--rdzv_id",
        "job",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"{hosts[0]['ip']}:{rdzv_port}",
        "--local-addr",
        hosts[node]["ip"],
    ]
    return flags + (["--rdzv-conf", "is_host=1"] if node == 0 else [])


@pytest.mark.parametrize("form", ["static", "c10d"])
def test_two_nodes_serve_probes_and_equal_one_rank(two_shards, completion_client, two_hosts, form):
    procs, ports = start_nodes(two_shards, two_hosts, form, SEQ)
    urls = [f"http://{h['ip']}:{p}" for h, p in zip(two_hosts, ports)]
    with running(*procs):
        for proc, url, host in zip(procs, urls, two_hosts):  # every node answers its probes
            wait_healthy(proc, url, host["netns"])
            assert get(url, host["netns"]) == (200, "Server is running")
        # Which node got global rank 0 is the rendezvous' choice in the elastic form: ask both.
        body = greedy_bodies()[5]
        answers = [post(f"{u}/generate", body, h["netns"]) for u, h in zip(urls, two_hosts)]
        master = 0 if answers[0][0] == 200 else 1
        assert answers[1 - master][0] == 404 and "rank 0" in answers[1 - master][1]["detail"]
        assert answers[master] == (200, completion_client.post("/generate", json=body).get_json())
        assert post(f"{urls[master]}/shutdown", None, two_hosts[master]["netns"]) == (200, {})
        results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0], results


def test_worker_node_health_follows_the_master(two_shards, two_hosts):
    """A worker node's /healthz is 200 only while rank 0's messages arrive; when rank 0 dies it exits non-zero."""
    # heartbeats every 3 s; a worker is stale after 7 s
    procs, ports = start_nodes(two_shards, two_hosts, "static", [*SEQ, "--dist_timeout", "12"])
    urls = [f"http://{h['ip']}:{p}" for h, p in zip(two_hosts, ports)]
    worker_ns = two_hosts[1]["netns"]
    with running(*procs):
        for proc, url, host in zip(procs, urls, two_hosts):
            wait_healthy(proc, url, host["netns"])
        master = descendants(procs[0].pid)
        for pid in master:
            os.kill(pid, signal.SIGSTOP)  # rank 0 hangs: no more messages
        try:
            time.sleep(8)
            status, body = get(f"{urls[1]}/healthz", worker_ns)
            assert status == 503 and "no message from rank 0" in body["detail"]
        finally:
            for pid in master:
                os.kill(pid, signal.SIGKILL)
        code, out = finish(procs[1], timeout=FAIL_BOUND_S)
        assert code != 0, out
