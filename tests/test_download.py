"""experiments.download against a local HTTP server serving ../shared/data/omniglot: a verified download,
a corrupted and a truncated response (resumed by a range request), offline, and the one-line errors."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest

from conftest import OMNIGLOT_DIR, ROOT
from experiments import download

SMALL = ('images_background_small1.zip', 'images_background_small2.zip')
needs_shared = pytest.mark.skipif(not all(os.path.exists(os.path.join(OMNIGLOT_DIR, f)) for f in SMALL),
                                  reason=f'the minimal Omniglot zips are not in {OMNIGLOT_DIR}')


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves OMNIGLOT_DIR with range requests; ``mode`` 'corrupt' flips bytes, 'truncate' closes the
    connection half-way through the first response (Content-Length announces the whole file)."""
    mode = 'ok'
    requests = []

    def __init__(self, *a, **k):
        super().__init__(*a, directory=OMNIGLOT_DIR, **k)

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = os.path.join(OMNIGLOT_DIR, self.path.lstrip('/'))
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
    Handler.mode, Handler.requests = 'ok', []
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
