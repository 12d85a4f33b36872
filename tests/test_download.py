"""experiments.download against a local HTTP server serving ../shared/data/omniglot: a verified download,
a corrupted and a truncated response (resumed by a range request), offline, and the one-line errors."""
import hashlib
import http.server
import os
import subprocess
import sys
import tarfile
import threading

import pytest

from conftest import OMNIGLOT_DIR, ROOT
from experiments import download

SMALL = ('images_background_small1.zip', 'images_background_small2.zip')
needs_shared = pytest.mark.skipif(not all(os.path.exists(os.path.join(OMNIGLOT_DIR, f)) for f in SMALL),
                                  reason=f'the minimal Omniglot zips are not in {OMNIGLOT_DIR}')


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``root`` (OMNIGLOT_DIR unless a test sets it) with range requests; ``mode`` 'corrupt' flips bytes,
    'truncate' closes the connection half-way through the first response (Content-Length announces the whole
    file)."""
    mode = 'ok'
    requests = []
    root = OMNIGLOT_DIR

    def __init__(self, *a, **k):
        super().__init__(*a, directory=Handler.root, **k)

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = os.path.join(Handler.root, self.path.lstrip('/'))
        if not os.path.isfile(path):
            return self.send_error(404)
        data = open(path, 'rb').read()
        rng = self.headers.get('Range')
        Handler.requests.append((self.path, rng))
        start = int(rng.split('=')[1].split('-')[0]) if rng else 0
        body = data[start:]
        if Handler.mode == 'corrupt':
            body = body[:1000] + bytes(b ^ 0xFF for b in body[1000:1064]) + body[1064:]
        self.send_response(206 if rng else 200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if Handler.mode == 'truncate':
            Handler.mode = 'ok'   # the next request is served whole
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    Handler.mode, Handler.requests, Handler.root = 'ok', [], OMNIGLOT_DIR
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def _sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


@needs_shared
def test_download_verifies_and_keeps_valid_files(server, tmp_path):
    logs = []
    files = download.download_omniglot(str(tmp_path), True, server, 10, log=logs.append)
    assert [os.path.basename(f) for f in files] == list(SMALL)
    assert all(_sha(f) == download.SHA256[os.path.basename(f)] for f in files)
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.part')]
    n = len(Handler.requests)
    download.download_omniglot(str(tmp_path), True, server, 10, log=logs.append)
    assert len(Handler.requests) == n and sum('present and valid' in l for l in logs) == 2


@needs_shared
def test_corrupted_download_is_refused_and_removed(server, tmp_path):
    Handler.mode = 'corrupt'
    with pytest.raises(download.DownloadError, match='sha256 .* differs .* corrupted'):
        download.download_omniglot(str(tmp_path), True, server, 10, log=lambda s: None)
    assert os.listdir(tmp_path) == []


@needs_shared
def test_truncated_download_resumes_with_a_range_request(server, tmp_path):
    Handler.mode = 'truncate'
    with pytest.raises(download.DownloadError, match='broke off after .* rerun to resume'):
        download.download_omniglot(str(tmp_path), True, server, 10, log=lambda s: None)
    part = tmp_path / (SMALL[0] + '.part')
    assert part.exists() and not (tmp_path / SMALL[0]).exists()
    half = os.path.getsize(part)
    download.download_omniglot(str(tmp_path), True, server, 10, log=lambda s: None)
    assert Handler.requests[1] == ('/' + SMALL[0], f'bytes={half}-')
    assert _sha(tmp_path / SMALL[0]) == download.SHA256[SMALL[0]]


def test_offline_and_usage_errors_are_one_line(tmp_path):
    import socket
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there
    cases = [(['omniglot', f'--dest={tmp_path}', '--minimal', f'--base_url=http://127.0.0.1:{port}'], 'cannot reach'),
             (['omniglot'], '--dest is required'), (['cifar'], 'usage'),
             (['omniglot', f'--dest={tmp_path}', '--base_url=not-a-url'], "--base_url='not-a-url' is not an http"),
             (['omniglot', f'--dest={tmp_path / "a_file"}'], 'is a file, not a folder')]
    (tmp_path / 'a_file').write_text('')
    for args, expect in cases:
        r = subprocess.run([sys.executable, '-m', 'experiments.download', *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and expect in err and 'Traceback' not in err, err
    r = subprocess.run([sys.executable, '-m', 'experiments.download', 'miniimagenet'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and 'no official' in r.stdout and 'train.csv' in r.stdout


def test_cifar100_archive_is_verified_by_its_md5(server, tmp_path, monkeypatch):
    """A CIFAR-100 archive in the official format, served locally: checked against the published md5 (here the
    small archive's own, as the real one's is eb9058c3...), tested as a tar.gz holding train, test and meta,
    kept when present and valid; a file of another md5 is refused and deleted, and a tar.gz without the
    archive's members too."""
    from md_meta.data import cifar100
    from tests.helpers import write_cifar100_archive
    served = tmp_path / 'served'
    served.mkdir()
    archive = write_cifar100_archive(served)
    Handler.root = str(served)
    assert download.MD5[download.CIFAR100] == cifar100.MD5 == 'eb9058c3a382ffc7106e4002c42a8d85'
    with pytest.raises(download.DownloadError, match=r'md5 .* differs .* corrupted'):
        download.download_cifar100(str(tmp_path / 'a'), server, 10, log=lambda s: None)
    assert os.listdir(tmp_path / 'a') == []
    monkeypatch.setitem(download.MD5, download.CIFAR100, hashlib.md5(open(archive, 'rb').read()).hexdigest())
    logs = []
    files = download.download_cifar100(str(tmp_path / 'b'), server, 10, log=logs.append)
    assert files == [str(tmp_path / 'b' / download.CIFAR100)] and _sha(files[0]) == _sha(archive)
    assert cifar100.load_splits(str(tmp_path / 'b'), 'fc100')['test'].num_classes == 20   # what the reader reads
    n = len(Handler.requests)
    download.download_cifar100(str(tmp_path / 'b'), server, 10, log=logs.append)
    assert len(Handler.requests) == n and any('present and valid' in l for l in logs)
    with tarfile.open(served / 'other.tar.gz', 'w:gz'):
        pass
    os.replace(served / 'other.tar.gz', archive)
    monkeypatch.setitem(download.MD5, download.CIFAR100, hashlib.md5(open(archive, 'rb').read()).hexdigest())
    with pytest.raises(download.DownloadError, match='no member cifar-100-python/train'):
        download.download_cifar100(str(tmp_path / 'c'), server, 10, log=lambda s: None)


def test_cifar100_cli_refuses_a_wrong_archive_in_one_line(server, tmp_path):
    """`python -m experiments.download cifar100 --dest=DIR --base_url=...`: an archive whose md5 is not the
    published one ends in one line naming it (exit status 2); nothing is left in DIR."""
    from tests.helpers import write_cifar100_archive
    served = tmp_path / 'served'
    served.mkdir()
    write_cifar100_archive(served)
    Handler.root = str(served)
    r = subprocess.run([sys.executable, '-m', 'experiments.download', 'cifar100', f'--dest={tmp_path / "d"}',
                        f'--base_url={server}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and 'cifar-100-python.tar.gz: md5' in err[-1] and 'Traceback' not in r.stderr, r.stderr
    assert os.listdir(tmp_path / 'd') == []
