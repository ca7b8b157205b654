"""`lorapipe serve` for real: the CLI in its own process (its own local Ray and Ray Serve), real
HTTP on 127.0.0.1, the `openai` client as the client. Adapters are trained in-process on the
tiny 4-bit base (as the demo trains it), written as contract run directories and registered in a
sqlite MLflow registry; the server resolves them from there like any user's.

The tiny random-init base does not learn a task in the seconds a test can spend, so each adapter
starts from random (not zero) LoRA weights and trains a few steps on its task: its answers are its
own, and the served answer of every row is checked against that adapter answering alone, in this
process, with stock PEFT.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from runkit import write_trained_run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = {"reverse": ("Reverse the word.", "a b c d"), "copy": ("Repeat the word.", "e f g h")}


def make_served_run(tmp: Path, name: str, task: str, *, base_dir: Path, uri: str, r: int, steps: int, seed: int):
    """A few real LoRA steps on the tiny 4-bit base for `task` from random LoRA weights, as a
    contract run directory."""
    return write_trained_run(tmp, name, [f"model.path={base_dir}", f"mlflow.tracking_uri={uri}",
                                         "data.path=builtin:demo-tasks", f"data.task={task}", "data.max_examples=200",
                                         f"lora.r={r}", f"lora.alpha={2 * r}", f"registry.name=srv-{task}", f"seed={seed}"],
                             steps=steps, lr=1e-3, batch=16, seed=seed, random_lora=True)


def local_answer(ref: str, uri: str, task: str, max_tokens: int = 6) -> str:
    """What one model answers alone, in this process (stock PEFT, no server, no batching)."""
    from pipelines.artifacts.resolve import load_for_inference, resolve
    from pipelines.data.prompts import alpaca_prompt
    from pipelines.eval.generation import greedy_answers

    model, tok = load_for_inference(resolve(ref, uri))
    return greedy_answers(model, tok, [alpaca_prompt(*QUESTIONS[task])], max_new_tokens=max_tokens)[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, url: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"serve did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three registered adapters (reverse v1 and v2, copy v1) on the tiny 4-bit base, a run directory
    trained on another base, and `lorapipe serve` running in its own process on reverse@champion
    and copy/1. Teardown stops it with `lorapipe serve --stop` and checks nothing is left."""
    import psutil

    from pipelines.data.builtin import materialize_tiny_llama
    from pipelines.registry.register import register_run
    from pipelines.tracking.runs import client

    tmp = tmp_path_factory.mktemp("serve")
    cache_before = os.environ.get("LORAPIPE_CACHE")
    os.environ["LORAPIPE_CACHE"] = str(tmp / "cache")  # registry downloads and the server's state file
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a busy machine
    base, other_base = materialize_tiny_llama(seed=0), materialize_tiny_llama(seed=1)
    runs = {key: make_served_run(tmp, key, task, base_dir=base, uri=uri, r=r, steps=3, seed=seed)
            for key, task, r, seed in (("rev1", "reverse", 8, 0), ("copy1", "copy", 4, 1), ("rev2", "reverse", 8, 2))}
    other = make_served_run(tmp, "other", "copy", base_dir=other_base, uri=uri, r=4, steps=1, seed=3)
    for key in ("rev1", "copy1", "rev2"):
        register_run(runs[key].path, tracking_uri=uri)
    client(uri).set_registered_model_alias("srv-reverse-adapter", "champion", "1")
    answers = {"rev1": local_answer("models:/srv-reverse-adapter/1", uri, "reverse"),
               "rev2": local_answer("models:/srv-reverse-adapter/2", uri, "reverse"),
               "copy1": local_answer("models:/srv-copy-adapter/1", uri, "copy"),
               "base-reverse": base_answer(runs["rev1"].path, "reverse"),
               "base-copy": base_answer(runs["rev1"].path, "copy")}
    torch.set_num_threads(threads)

    port, log = free_port(), tmp / "serve.log"
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "models:/srv-reverse-adapter@champion",
           "models:/srv-copy-adapter/1", "--port", str(port), "--tracking-uri", uri, "--follow-interval", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, url, log)
        yield {"url": url, "port": port, "uri": uri, "runs": runs, "other": other, "answers": answers, "proc": proc}
    finally:
        from pipelines.cli import main

        rc = main(["serve", "--stop", "--port", str(port)]) if proc.poll() is None else None
        proc.wait(timeout=120)
        deadline, leftover = time.monotonic() + 30, []
        while time.monotonic() < deadline:  # Ray's helpers exit on their own once their raylet is gone
            leftover = [p for p in psutil.process_iter(["pid", "status"])
                        if _session_of(p) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE]
            if not leftover:
                break
            time.sleep(1)
        for p in leftover:  # our own session only, by PID
            p.kill()
        if cache_before is None:
            os.environ.pop("LORAPIPE_CACHE", None)
        else:
            os.environ["LORAPIPE_CACHE"] = cache_before
        assert rc == 0 and proc.returncode == 0, log.read_text()[-3000:]
        assert not leftover, f"processes left behind by serve: {[p.pid for p in leftover]}"


def _session_of(p) -> int:
    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, PermissionError):
        return -1


def base_answer(run_dir: Path, task: str, max_tokens: int = 6) -> str:
    from pipelines.artifacts.resolve import load_base_for_inference, resolve
    from pipelines.data.prompts import alpaca_prompt
    from pipelines.eval.generation import greedy_answers

    model, tok = load_base_for_inference(resolve(str(run_dir)))
    return greedy_answers(model, tok, [alpaca_prompt(*QUESTIONS[task])], max_new_tokens=max_tokens)[0]


def openai_client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served['url']}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client, model: str, task: str, max_tokens: int = 6) -> str:
    instruction, word = QUESTIONS[task]
    r = client.completions.create(model=model, prompt=instruction, max_tokens=max_tokens, extra_body={"input": word})
    return r.choices[0].text


def test_models_lists_base_and_adapters_with_version_alias_rank(served):
    models = {m.id: m.model_extra["lorapipe"] for m in openai_client(served).models.list()}
    assert set(models) == {"tiny-llama-seed0", "srv-reverse-adapter", "srv-copy-adapter"}
    assert models["tiny-llama-seed0"]["kind"] == "base"
    rev, cp = models["srv-reverse-adapter"], models["srv-copy-adapter"]
    assert (rev["version"], rev["aliases"], rev["rank"]) == ("1", ["champion"], 8)
    assert (cp["version"], cp["aliases"], cp["rank"]) == ("1", [], 4)


def test_one_batch_of_both_adapters_and_the_base_answers_each_as_alone(served):
    a, client = served["answers"], openai_client(served)
    assert len({a["rev1"], a["copy1"], a["base-reverse"]}) == 3 and a["copy1"] != a["base-copy"]
    before = requests.get(f"{served['url']}/health").json()
    jobs = [("srv-reverse-adapter", "reverse", "rev1"), ("srv-copy-adapter", "copy", "copy1"),
            ("tiny-llama-seed0", "reverse", "base-reverse"), ("tiny-llama-seed0", "copy", "base-copy")] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: complete(client, j[0], j[1]), jobs))
    assert got == [a[key] for _, _, key in jobs]
    after = requests.get(f"{served['url']}/health").json()
    assert after["mixed_batches"] > before["mixed_batches"]  # rows of different adapters shared a generate()
    assert after["rows"] - before["rows"] == len(jobs) and after["batches"] - before["batches"] < len(jobs)


def test_chat_and_streaming_give_the_same_answer(served):
    client, want = openai_client(served), served["answers"]["copy1"]
    instruction, word = QUESTIONS["copy"]
    messages = [{"role": "system", "content": word}, {"role": "user", "content": instruction}]
    chat = client.chat.completions.create(model="srv-copy-adapter", messages=messages, max_tokens=6)
    assert chat.choices[0].message.content == want and chat.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="srv-copy-adapter", messages=messages, max_tokens=6, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == want and len(pieces) >= 2
    raw = requests.post(f"{served['url']}/v1/completions", json={"model": "srv-copy-adapter", "prompt": instruction,
                        "input": word, "max_tokens": 6, "stream": True}, stream=True, timeout=60)
    events = [line for line in raw.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == want


def test_bad_requests_get_4xx_naming_the_problem_and_the_server_keeps_serving(served):
    import openai

    client, url = openai_client(served), served["url"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert "srv-reverse-adapter" in str(e.value) and "srv-copy-adapter" in str(e.value)
    cases = [(b'{"model": "srv-copy-adapter", "prompt": ', "not valid JSON"),
             (b'{"prompt": "x"}', "'model' is required"),
             (b'{"model": "srv-copy-adapter"}', "'prompt' is required"),
             (b'{"model": "srv-copy-adapter", "prompt": "x", "max_tokens": 0}', "max_tokens=0 is out of range"),
             (b'{"model": "srv-copy-adapter", "prompt": "x", "max_tokens": 100000}', "out of range"),
             (b'{"model": "srv-copy-adapter", "prompt": "x", "max_tokens": "5"}', "'max_tokens' is invalid")]
    for body, expected in cases:
        r = requests.post(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and expected in r.json()["error"]["message"], (body, r.text)
    r = requests.post(f"{url}/v1/chat/completions", json={"model": "srv-copy-adapter", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert complete(client, "srv-copy-adapter", "copy") == served["answers"]["copy1"]


def test_a_burst_of_200_concurrent_requests_all_complete(served):
    a, url = served["answers"], served["url"]
    jobs = [("srv-reverse-adapter", "reverse", "rev1"), ("srv-copy-adapter", "copy", "copy1")] * 100

    def ask(job):
        instruction, word = QUESTIONS[job[1]]
        r = requests.post(f"{url}/v1/completions", json={"model": job[0], "prompt": instruction, "input": word,
                                                         "max_tokens": 6}, timeout=300)
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(ask, jobs))
    assert [status for status, _ in results] == [200] * 200
    assert [text for _, text in results] == [a[key] for _, _, key in jobs]


def test_alias_move_is_served_without_restart_and_no_request_fails(served):
    from pipelines.tracking.runs import client as mlflow_client

    a, url, pid = served["answers"], served["url"], served["proc"].pid
    assert a["rev1"] != a["rev2"]
    instruction, word = QUESTIONS["reverse"]
    seen, failures, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                r = requests.post(f"{url}/v1/completions", json={"model": "srv-reverse-adapter", "prompt": instruction,
                                                                 "input": word, "max_tokens": 6}, timeout=60)
                if r.status_code == 200:
                    seen.append(r.json()["choices"][0]["text"])
                else:
                    failures.append(r.text)
            except requests.RequestException as e:
                failures.append(repr(e))

    workers = [threading.Thread(target=loop) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(2)
        mlflow_client(served["uri"]).set_registered_model_alias("srv-reverse-adapter", "champion", "2")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (seen and seen[-1] == a["rev2"]):
            time.sleep(0.5)
        time.sleep(2)  # a little more traffic after the switch
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert not failures, failures[:3]
    assert set(seen) == {a["rev1"], a["rev2"]}
    switched = seen.index(a["rev2"])
    assert all(s == a["rev2"] for s in seen[switched + 3:])  # in-flight stragglers aside, once switched, v2 only
    models = {m["id"]: m["lorapipe"] for m in requests.get(f"{url}/v1/models").json()["data"]}
    assert models["srv-reverse-adapter"]["version"] == "2" and models["srv-reverse-adapter"]["aliases"] == ["champion"]
    assert served["proc"].poll() is None and served["proc"].pid == pid


def test_start_up_errors_are_one_line_exit_2(served, capsys):
    from pipelines.cli import main

    uri, runs = served["uri"], served["runs"]
    cases = [
        (["serve", "models:/srv-nope-adapter@champion", "--tracking-uri", uri, "--port", str(free_port())],
         "has no alias 'champion'"),
        (["serve", str(runs["rev1"].path), str(served["other"].path), "--port", str(free_port())],
         "not on the served base"),
        (["serve", str(runs["rev1"].path), "--port", str(served["port"])], "in use"),
        (["serve", "--port", str(free_port())], "at least one REF"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)


def test_per_model_request_counts_and_latency_reach_rays_metrics(served):
    """Counter/Histogram from ray.serve.metrics, scraped from the Prometheus endpoint of the
    server's own Ray node (its session directory records the port)."""
    import glob

    client, url = openai_client(served), served["url"]
    for task in ("copy", "reverse"):  # this test's own requests: it depends on no other test's
        for _ in range(3):
            complete(client, f"srv-{task}-adapter", task)
    assert requests.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    bad = {"model": "srv-copy-adapter", "prompt": "x", "max_tokens": 0}  # a bad request for a known model
    assert requests.post(f"{url}/v1/completions", json=bad).status_code == 400
    sessions = sorted(glob.glob(f"/tmp/ray/session_*_{served['proc'].pid}"), key=os.path.getmtime)
    assert sessions, "the server's Ray session directory is not there"
    port = Path(glob.glob(f"{sessions[-1]}/metrics_export_port_*")[0]).read_text().strip()
    need = {("srv-copy-adapter", "200"): 3, ("srv-reverse-adapter", "200"): 3, ("(unknown)", "404"): 1,
            ("srv-copy-adapter", "400"): 1}
    deadline, by, text = time.monotonic() + 180, {}, ""
    while time.monotonic() < deadline:  # Ray exports metrics every few seconds; slower on a busy box
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        by = request_counts(text)
        if all(by.get(key, 0) >= n for key, n in need.items()):
            break
        time.sleep(2)
    assert all(by.get(key, 0) >= n for key, n in need.items()), by
    assert any(line.startswith("ray_lorapipe_serve_request_latency_s_count{") and 'model="srv-copy-adapter"' in line
               for line in text.splitlines())


def request_counts(metrics_text: str) -> dict:
    """{(model, status): count} from the lorapipe_serve_requests counter in Prometheus text."""
    counts = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
              if line.startswith("ray_lorapipe_serve_requests_total{")}
    return {(m, s): v for k, v in counts.items() for m in ("srv-copy-adapter", "srv-reverse-adapter", "(unknown)")
            for s in ("200", "400", "404") if f'model="{m}"' in k and f'status="{s}"' in k}
