"""Fetch a data set into a folder, verified.

    python -m experiments.download omniglot --dest=~/data/omniglot             # background + evaluation
    python -m experiments.download omniglot --dest=~/data/omniglot --minimal   # the two small sets
    python -m experiments.download cifar100 --dest=~/data/cifar100             # CIFAR-FS and FC100
    python -m experiments.download miniimagenet                                # where to get it
    python -m experiments.download tieredimagenet                              # where to get it

Omniglot's zips come from the authors' repository (github.com/brendenlake/omniglot, python/), CIFAR-100's
python archive from its page (www.cs.toronto.edu/~kriz/cifar.html); --base_url names a mirror. Each file is downloaded to <name>.part, resumed with an HTTP range request
when a .part is left from an interrupted run (restarted when the server does not resume), checked
(sha256 or the published md5 where known, else the announced size) and tested as a zip or tar.gz holding the
expected folder, then
renamed into place: a file under its final name is always complete. Files already present and valid are
kept. Every failure (offline, HTTP error, truncated or corrupted download) ends with one line naming the
file and what to do (exit status 2). mini- and tieredImageNet have no official direct URL: the command prints
where to get them and the layouts md-meta reads.

md-meta keeps this downloader rather than pooch: pooch would add requests, platformdirs and packaging as
dependencies, and it downloads into a temporary file that it deletes on failure, so an interrupted download
starts again from zero where this one resumes its .part. pooch's gains would be automatic retries (here a failure
ends with one line and a rerun resumes) and a progress bar where tqdm is installed (here a line every 10% where
the server announces the size).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from absl import flags

from .harness import fail, run


OMNIGLOT_FULL = ('images_background', 'images_evaluation')
OMNIGLOT_MINIMAL = ('images_background_small1', 'images_background_small2')
SHA256 = {  # ../shared/data/omniglot/README.md
    'images_background_small1.zip': 'f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4',
    'images_background_small2.zip': '3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f',
}
CIFAR100 = 'cifar-100-python.tar.gz'
MD5 = {CIFAR100: 'eb9058c3a382ffc7106e4002c42a8d85'}   # published on www.cs.toronto.edu/~kriz/cifar.html
BASE_URLS = {'omniglot': 'https://raw.githubusercontent.com/brendenlake/omniglot/master/python',
             'cifar100': 'https://www.cs.toronto.edu/~kriz'}
CHUNK = 1 << 20
MINIIMAGENET_HELP = """miniImageNet (Vinyals et al. 2016; Ravi and Larochelle's 64/16/20 class split) has no official
direct download. md-meta reads either layout from config.task.data_dir ($MINIIMAGENET_DIR):
  (a) images/<file>.jpg with train.csv, val.csv, test.csv (header "filename,label"), the layout of
      Ravi and Larochelle's split files (github.com/twitter/meta-learning-lstm, data/miniImagenet) with the
      images cut from ImageNet (ILSVRC-2012, image-net.org, after accepting its terms);
  (b) mini-imagenet-cache-{train,val,test}.pkl, the pickles distributed with several few-shot code bases.
Then: python -m experiments.train --config=experiments/configs/miniimagenet.py:md"""
TIEREDIMAGENET_HELP = """tieredImageNet (Ren et al. 2018: 608 ImageNet classes under 34 high-level categories, the categories split
20/6/8 into 351/97/160 classes) has no official direct download. md-meta reads either layout from
config.task.data_dir ($TIEREDIMAGENET_DIR):
  (a) train/, val/, test/, each with one folder per class of images (resized to 84x84), e.g. built from
      ImageNet (ILSVRC-2012, image-net.org, after accepting its terms) with Ren et al.'s class lists
      (github.com/renmengye/few-shot-ssl-public, tiered-imagenet);
  (b) {train,val,test}_labels.pkl with {split}_images_png.pkl (the files Ren et al.'s scripts produce) or
      {split}_images.npz (key images: the decoded form several code bases use).
Then: python -m experiments.train --config=experiments/configs/tieredimagenet.py:md"""


class DownloadError(Exception):
    """A download failed; the message names the file and what to do."""


def sha256_of(path: str, algorithm: str = 'sha256') -> str:
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(CHUNK), b''):
            h.update(block)
    return h.hexdigest()


def check_tar(path: str, top: str, members) -> None:
    """DownloadError unless ``path`` is a readable tar.gz holding ``top``/m for every m of ``members``."""
    try:
        with tarfile.open(path, 'r:gz') as t:
            names = set(t.getnames())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DownloadError(f'{path}: not a valid tar.gz ({e})') from e
    missing = [m for m in members if f'{top}/{m}' not in names]
    if missing:
        raise DownloadError(f'{path}: no member {top}/{missing[0]}')


def check_zip(path: str, top: str) -> None:
    """DownloadError unless ``path`` is a readable zip whose members all lie under ``top``/."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f'{path}: not a valid zip ({e})') from e
    if bad is not None:
        raise DownloadError(f'{path}: member {bad} fails its CRC check')
    if not names or any(not n.startswith(top + '/') for n in names if not n.startswith('__MACOSX')):
        raise DownloadError(f'{path}: expected every member under {top}/')


def verify(path: str, name: str, size: int | None = None) -> None:
    """sha256 or md5 where known, else the announced size; then a zip / tar.gz integrity check."""
    for algorithm, known in (('sha256', SHA256), ('md5', MD5)):
        if name in known:
            got = sha256_of(path, algorithm)
            if got != known[name]:
                raise DownloadError(f'{name}: {algorithm} {got[:16]}... differs from the published '
                                    f'{known[name][:16]}... (a corrupted download); it was deleted, rerun to '
                                    'download it again')
            break
    else:
        if size is not None and os.path.getsize(path) != size:
            raise DownloadError(f'{name}: {os.path.getsize(path)} bytes, the server announced {size}; rerun to '
                                'download it again')
    if name == CIFAR100:
        check_tar(path, 'cifar-100-python', ('train', 'test', 'meta'))
    else:
        check_zip(path, name[:-len('.zip')])


def fetch(url: str, dest: str, name: str, timeout: float, log=print) -> str:
    """Downloads ``url`` to dest/name through dest/name.part (resumed when possible) and verifies it."""
    final = os.path.join(dest, name)
    part = final + '.part'
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:   # the .part is already complete
            response = None
        else:
            raise DownloadError(f'{url}: HTTP {e.code} {e.reason}; check --base_url, or download {name} by '
                                f'hand into {dest}') from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, 'reason', e)
        raise DownloadError(f'cannot reach {url} ({reason}); check the network (or --base_url), or download '
                            f'{name} by hand into {dest}') from e
    total = None
    if response is not None:
        with response:
            resumed = response.status == 206
            if have and not resumed:
                log(f'{name}: the server does not resume; downloading again')
                have = 0
            length = response.headers.get('Content-Length')
            total = have + int(length) if length is not None else None
            done, shown = have, -1
            try:
                with open(part, 'ab' if resumed else 'wb') as f:
                    while True:
                        block = response.read(CHUNK)
                        if not block:
                            break
                        f.write(block)
                        done += len(block)
                        if total:
                            pct = int(100 * done / total) // 10 * 10
                            if pct != shown:
                                log(f'{name}: {pct}% of {total / 1e6:.1f} MB')
                                shown = pct
            except (OSError, http.client.HTTPException) as e:   # timeouts, resets, IncompleteRead
                raise DownloadError(f'{name}: the download broke off after {done} bytes ({type(e).__name__}); '
                                    'rerun to resume it') from e
            if total is not None and done < total:
                raise DownloadError(f'{name}: the download broke off after {done} of {total} bytes; rerun to '
                                    'resume it')
    try:
        verify(part, name, total)
    except DownloadError:
        os.remove(part)
        raise
    os.replace(part, final)
    return final


def download_files(names, dest: str, base_url: str, timeout: float, log=print) -> list:
    """dest/name for each name, kept where present and valid, else fetched from base_url/name and verified."""
    os.makedirs(dest, exist_ok=True)
    out = []
    for name in names:
        final = os.path.join(dest, name)
        if os.path.exists(final):
            try:
                verify(final, name)
                log(f'{final}: present and valid')
                out.append(final)
                continue
            except DownloadError as e:
                log(f'{final}: {e}; downloading again')
                os.remove(final)
        out.append(fetch(f'{base_url.rstrip("/")}/{name}', dest, name, timeout, log))
        log(f'{final}: downloaded and verified')
    return out


def check_arguments(dest: str, base_url: str) -> str:
    """'' or what is wrong with --dest / --base_url, found before anything is fetched."""
    url = urllib.parse.urlparse(base_url)
    if url.scheme not in ('http', 'https', 'file') or (url.scheme != 'file' and not url.netloc):
        return f'--base_url={base_url!r} is not an http(s):// or file:// URL'
    if os.path.exists(dest) and not os.path.isdir(dest):
        return f'--dest={dest} is a file, not a folder; pass a folder (created if missing)'
    return ''


def download_omniglot(dest: str, minimal: bool, base_url: str, timeout: float, log=print) -> list:
    sets = OMNIGLOT_MINIMAL if minimal else OMNIGLOT_FULL
    return download_files([s + '.zip' for s in sets], dest, base_url, timeout, log)


def download_cifar100(dest: str, base_url: str, timeout: float, log=print) -> list:
    """cifar-100-python.tar.gz (161 MB, md5-verified), read as it is by md_meta.data.cifar100 (CIFAR-FS, FC100)."""
    return download_files([CIFAR100], dest, base_url, timeout, log)


def main(argv):
    if len(argv) != 2 or argv[1] not in ('omniglot', 'cifar100', 'miniimagenet', 'tieredimagenet'):
        fail('usage: python -m experiments.download omniglot|cifar100|miniimagenet|tieredimagenet [--dest=DIR] '
             '[--minimal]')
    what = argv[1]
    if what in ('miniimagenet', 'tieredimagenet'):
        print(MINIIMAGENET_HELP if what == 'miniimagenet' else TIEREDIMAGENET_HELP)
        return
    if not _DEST.value:
        fail('--dest is required: the folder to write the files into (config.task.data_dir)')
    dest = os.path.expanduser(_DEST.value)
    base_url = _BASE_URL.value or BASE_URLS[what]
    problem = check_arguments(dest, base_url)
    if problem:
        fail(problem)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    try:
        if what == 'cifar100':
            files = download_cifar100(dest, base_url, _TIMEOUT.value, log=log)
        else:
            files = download_omniglot(dest, _MINIMAL.value, base_url, _TIMEOUT.value, log=log)
    except DownloadError as e:
        fail(e)
    if what == 'cifar100':
        print(f'{files[0]}; train with CIFAR100_DIR={dest} python -m experiments.train '
              '--config=experiments/configs/cifar_fs.py (or fc100.py)')
        return
    config = 'omniglot_minimal.py' if _MINIMAL.value else 'omniglot.py'
    print(f'{len(files)} files in {dest}; train with OMNIGLOT_DIR={dest} python -m experiments.train '
          f'--config=experiments/configs/{config}')


if __name__ == '__main__':
    _DEST = flags.DEFINE_string('dest', '', 'Folder to write into (created if missing); config.task.data_dir.')
    _MINIMAL = flags.DEFINE_bool('minimal', False, 'Omniglot: the two small background sets of the minimal '
                                 'condition instead of images_background + images_evaluation.')
    _BASE_URL = flags.DEFINE_string('base_url', '', 'Where the files are served (default: the official place, '
                                    f'omniglot {BASE_URLS["omniglot"]}, cifar100 {BASE_URLS["cifar100"]}).')
    _TIMEOUT = flags.DEFINE_float('timeout', 60.0, 'Seconds without data before a download is given up.')
    run(main)
