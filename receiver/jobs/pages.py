"""The results of a batch page by page, for when artifact-url offers no download.

BatchRouter gives results "either page by page or as a single signed download" (docs/batchrouter-api.md, "Results pages"): the
signed download is preferred and used whenever artifact-url names one; when it answers that there
is none (`ArtifactUnavailable`), the worker pages through `GET /v1/batches/{id}/results` and stores
the rows as the same `results.jsonl`, one row per line, with the manifest's `source` saying
`results_pages`. The file goes through the same writer as a download, so it is never visible at its
final key before the last page is in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from ..batchrouter import BatchRouterClient
from ..errors import BadRequest, IncompleteDownload, UnexpectedResponse
from ..storage import Writer
from .tally import LineCounter, TransferResult

#: Rows asked for per page. The maximum is undocumented (docs/batchrouter-api.md, "Open questions"): a 400 for it is answered by
#: asking again without `limit`, so the API's own default applies.
PAGE_LIMIT = 1000
#: Guards against an API that hands out new cursors for ever: far beyond any batch's pages, and
#: more empty pages in a row than a result with gaps would plausibly have.
MAX_PAGES = 1_000_000
MAX_EMPTY_PAGES = 10


def write_pages(
    client: BatchRouterClient,
    batch_id: str,
    writer: Writer,
    progress: Callable[[int, int | None], None] | None = None,
    *,
    expected_items: int | None = None,
) -> TransferResult:
    """Page through the batch's results into `writer` (a `.jsonl` file), left for the caller to
    commit or abort. `progress(bytes, None)` runs after each block written; what it raises (a lost
    lease) stops the paging.

    Raw JSONL that came unframed (no Content-Length, not chunked) would look whole if the
    connection broke early, so it is only kept when its lines match `expected_items` (the batch's
    count) or, with no count, when it ends at the end of a line.
    """
    digest = hashlib.sha256()
    size = lines = 0
    cursor: str | None = None
    limit: int | None = PAGE_LIMIT
    seen: set[str] = set()
    empty = 0
    for _ in range(MAX_PAGES):
        try:
            with client.results_page(batch_id, cursor=cursor, limit=limit) as page:
                counter = LineCounter()
                for chunk in page.chunks:
                    writer.write(chunk)
                    digest.update(chunk)
                    counter.feed(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(size, None)
        except BadRequest:
            if limit is None:
                raise
            limit = None  # our page size refused: let the API choose
            continue
        rows = counter.finish()
        if not page.framed:
            _check_unframed(batch_id, rows, counter.last, expected_items)
        lines += rows
        if page.next_cursor is None:
            return TransferResult(bytes=size, sha256=digest.hexdigest(), lines=lines, suffix=".jsonl")
        empty = 0 if rows else empty + 1
        if empty > MAX_EMPTY_PAGES:
            raise UnexpectedResponse(f"results of batch {batch_id}: {empty} empty pages in a row, each saying there is more")
        if page.next_cursor in seen:
            raise UnexpectedResponse(f"results of batch {batch_id}: the cursor {page.next_cursor!r} came back again")
        seen.add(page.next_cursor)
        cursor = page.next_cursor
    raise UnexpectedResponse(f"results of batch {batch_id}: more than {MAX_PAGES} pages")


def _check_unframed(batch_id: str, lines: int, last: bytes, expected_items: int | None) -> None:
    if expected_items is not None and lines != expected_items:
        raise IncompleteDownload(
            f"results of batch {batch_id} ended after {lines} lines, with no length to check them by; "
            f"the batch counts {expected_items} items"
        )
    if expected_items is None and last != b"\n":
        raise IncompleteDownload(f"results of batch {batch_id} ended mid-line, with no length to check them by")
