"""Drafts (found in review): what ``sign``/``publish`` report as gathered must be signatures that
verify (docs/FORMAT.md §14). A signature entry that names a role's key id but does not verify
(a draft edited after signing, or signed over other bytes) used to count as gathered, so
``publish`` refused with "1 of 1 signatures": a contradiction the key holders cannot act on."""

from __future__ import annotations

from manifest.draft import Draft, DraftDocument

from ._signed_docs import Repo, key


def _draft(repo: Repo) -> Draft:
    _, _, pointer = repo.publish()
    manifest = repo.manifest_doc(pointer).to_dict()
    return Draft("refresh", repo.repository_id, "store", repo.root_bytes,
                 [DraftDocument("manifest", "manifest.json", "release", manifest)])


def test_a_signature_that_does_not_verify_is_not_counted_as_gathered() -> None:
    repo = Repo(release_keys=[key(71), key(72)], release_threshold=2)
    draft = _draft(repo)
    doc = draft.document("manifest")
    draft.sign([key(71)])
    assert draft.missing() == [
        "manifest (manifest.json): 1 of 2 signatures from the release keys of trust root v1"]
    # Key 72's entry, but over other bytes (as if the document was edited after signing).
    forged = key(72).sign({**doc.signed, "sequence": 99})
    doc.signatures.append(forged)
    assert draft.missing() == [
        "manifest (manifest.json): 1 of 2 signatures from the release keys of trust root v1 "
        "(1 more that do not verify: signed other bytes or tampered with)"]
    assert draft.status()[0]["signatures"] == 1
    # `sign` by key 72 does not add a second entry for it (FORMAT §14), so the draft must be
    # signed again from a fresh copy; with a good entry it is complete.
    doc.signatures[-1] = key(72).sign(doc.signed)
    assert draft.missing() == [] and draft.status()[0]["signatures"] == 2
