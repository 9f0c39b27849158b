"""Pretrained weights by name: where TAEF2 and diffusers autoencoders are looked for, in which order,
with fake hub caches (HF_HUB_CACHE / HF_HOME pointed at tmp).  No test touches the network."""
import json

import pytest
import torch

from hen_kernels.hen import taef2

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ("HEN_TAEF2_DIR", "HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network, whatever a test forgets
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _random_taef2(seed: int):
    torch.manual_seed(seed)
    enc, dec = taef2.make_encoder(), taef2.make_decoder()
    return enc, dec


def _published_layout(enc, dec) -> dict:
    """The keys of the published taef2.safetensors: ``encoder.layers.N`` and ``decoder.layers.N`` with the
    decoder counted without its parameter-free clamp (index 0 of ours)."""
    sd = {f"encoder.layers.{k}": v.half() for k, v in enc.state_dict().items()}
    for k, v in dec.state_dict().items():
        i, rest = k.split(".", 1)
        sd[f"decoder.layers.{int(i) - 1}.{rest}"] = v.half()
    return sd


def _pth_folder(path, enc, dec):
    path.mkdir(parents=True)
    torch.save({k: v.half() for k, v in enc.state_dict().items()}, path / taef2.ENCODER_FILE)
    torch.save({k: v.half() for k, v in dec.state_dict().items()}, path / taef2.DECODER_FILE)
    return path


def _fake_hub_cache(cache, repo, files: dict, commit="0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout huggingface_hub writes: refs/main -> snapshots/<commit>/<file>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, write in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        write(snap / name)
    return snap


def _same(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def _cache_with(cache, enc, dec):
    sd = _published_layout(enc, dec)
    return _fake_hub_cache(cache, taef2.HUB_REPO,
                           {taef2.HUB_FILE: lambda p: safetensors_torch.save_file(sd, str(p))})


def test_published_safetensors_layout_loads_like_the_pth_pair(tmp_path):
    enc, dec = _random_taef2(0)
    f = tmp_path / "w" / taef2.HUB_FILE
    f.parent.mkdir()
    safetensors_torch.save_file(_published_layout(enc, dec), str(f))
    e1, d1 = taef2.load_taef2(f, download=False)
    e2, d2 = taef2.load_taef2(_pth_folder(tmp_path / "pth", enc, dec), download=False)
    _same(e1, e2)
    _same(d1, d2)
    _same(e1, enc.half().float())  # float16 on disk, float32 in memory
    e3, _ = taef2.load_taef2(f.parent, download=False)  # the folder holding the file
    _same(e1, e3)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(e1(x), e2(x))


def test_wrong_file_is_refused_by_name(tmp_path):
    f = tmp_path / taef2.HUB_FILE
    safetensors_torch.save_file({"encoder.layers.0.weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(ValueError, match="source: .*do not fit TAEF2|no decoder"):
        taef2.load_taef2(f, download=False)


def test_weights_that_do_not_read_are_refused_by_name(tmp_path):
    """A file cut short (or another format) raised torch's or safetensors' own error, naming neither the file nor
    what it was meant to hold."""
    enc, dec = taef2.make_encoder(), taef2.make_decoder()
    folder = _pth_folder(tmp_path / "pth", enc, dec)
    whole = (folder / taef2.ENCODER_FILE).read_bytes()
    (folder / taef2.ENCODER_FILE).write_bytes(whole[: len(whole) // 2])
    hub = tmp_path / "hub" / taef2.HUB_FILE
    hub.parent.mkdir()
    hub.write_bytes(b"not a safetensors file")
    for source, name in ((folder, taef2.ENCODER_FILE), (hub, taef2.HUB_FILE)):
        with pytest.raises(ValueError, match=rf"^source: .*{name} does not read as TAEF2 weights"):
            taef2.load_taef2(source, download=False)


def test_resolution_order(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _cache_with(cache, *_random_taef2(1))
    env_dir = _pth_folder(tmp_path / "env", *_random_taef2(2))
    arg_dir = _pth_folder(tmp_path / "arg", *_random_taef2(3))

    # nothing set: not found, and no download offline
    where, why = taef2.find_taef2(download=True)
    assert where is None and "HF_HUB_OFFLINE" in why
    # the hub cache, through HF_HOME/hub or HF_HUB_CACHE
    (tmp_path / "home_hf").mkdir()
    (tmp_path / "home_hf" / "hub").symlink_to(cache)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home_hf"))
    assert taef2.find_taef2_dir().name == taef2.HUB_FILE
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    hub = taef2.find_taef2_dir()
    assert hub.name == taef2.HUB_FILE and "snapshots" in str(hub)
    # $HEN_TAEF2_DIR comes before the cache ...
    monkeypatch.setenv("HEN_TAEF2_DIR", str(env_dir))
    assert taef2.find_taef2_dir() == env_dir
    # ... and the argument before both; an argument is the only place looked in
    assert taef2.find_taef2_dir(arg_dir) == arg_dir
    assert taef2.find_taef2_dir(tmp_path / "nowhere") is None
    # a hub id as the argument reads the cache
    assert taef2.find_taef2_dir(taef2.HUB_REPO) == hub
    assert taef2.find_taef2_dir("someone/other-taef2") is None
    enc, _ = taef2.load_taef2(taef2.HUB_REPO, download=False)
    _same(enc, _random_taef2(1)[0].half().float())


def test_codec_loads_from_the_cache(tmp_path, monkeypatch):
    from hen_kernels.hen.codecs import TAEF2Codec

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_with(tmp_path / "hub", *_random_taef2(4))
    c = TAEF2Codec()
    assert c.encode(torch.rand(2, 1, 28, 28)).shape == (2, 512)


def test_missing_message_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as e:
        taef2.load_taef2()
    msg = str(e.value)
    assert "https://huggingface.co/madebyollin/taef2" in msg and "HEN_TAEF2_DIR" in msg
    assert "HF_HUB_OFFLINE" in msg and str(tmp_path / "empty") in msg
    assert "shared" not in msg and "/work" not in msg  # never a development path
    monkeypatch.setenv("HEN_TAEF2_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="HEN_TAEF2_DIR"):
        taef2.load_taef2()


def test_download_is_attempted_only_when_allowed(tmp_path, monkeypatch):
    calls = []
    hub = pytest.importorskip("huggingface_hub")

    def fake_download(repo, filename, cache_dir=None, **kw):
        calls.append((repo, filename, cache_dir))
        enc, dec = _random_taef2(5)
        return str(_cache_with(tmp_path / "dl", enc, dec) / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert taef2.find_taef2(download=True)[0] is None and not calls  # offline: no call
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert taef2.find_taef2(download=False)[0] is None and not calls  # asked not to
    where, _ = taef2.find_taef2(download=True)
    assert where.name == taef2.HUB_FILE
    assert calls == [(taef2.HUB_REPO, taef2.HUB_FILE, str(tmp_path / "cache"))]


def test_diffusers_by_hub_id_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from hen_kernels.hen.codecs import DiffusersCodec
    from tests.test_codecs import _tiny_diffusers

    model = _tiny_diffusers("AutoencoderTiny")
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    files = {f"vae/{p.name}": (lambda dst, src=p: dst.write_bytes(src.read_bytes())) for p in saved.iterdir()}
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-pipeline", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    c = DiffusersCodec("someone/tiny-pipeline", subfolder="vae")
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(c.encode(x), DiffusersCodec(model).encode(x))
    assert json.loads((saved / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    with pytest.raises(FileNotFoundError, match="hub cache"):
        DiffusersCodec("someone/not-cached")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        DiffusersCodec(str(tmp_path / "no" / "such" / "folder"))


def test_codecs_are_reachable_as_hk_codecs_without_heavy_imports():
    import subprocess
    import sys

    code = ("import sys, hen_kernels as hk; assert 'diffusers' not in sys.modules; "
            "assert hk.codecs.TAEF2Codec.__module__ == 'hen_kernels.hen.codecs'")
    subprocess.run([sys.executable, "-c", code], check=True)
