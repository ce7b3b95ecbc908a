"""Turning one user point of an export into its operations (docs/operations.md, "Export files").

This is the hot path of an initial synchronization, so it validates its inputs while building and never re-parses
its own output; `tests/test_exports.py` proves that everything it emits passes `operations.validate_operation`.
The hot loop checks the common, valid case inline; the helpers below run only for odd or bad input, where the
element's index is recovered by identity to name it in the reason.
"""

from __future__ import annotations

from typing import Any, NoReturn

import orjson

from dmrepl.operations import CONTROL_RE, UUID_RE, Message, Rejected, encode, show

NEW_DEVICE_MODEL = "v202205"

_uuid_match = UUID_RE.fullmatch
_control_search = CONTROL_RE.search


class InvalidLine(Rejected):
    """A user-point line that must be rejected as a whole."""


# The hot loop checks the common, valid case inline; the helpers below only run for odd or bad input, where the
# element's index is recovered by identity to name it in the reason.

_UPDATE = "UPDATE"
_DELETE = "DELETE"
_TS = "a timestamp (non-negative integer, ms)"
_SEG_ID = "a non-empty id without ':' or control characters"
_TAIL_ID = "a non-empty id without control characters"
_UDP_ID = "a user device point id (udp:<digits>)"


def _loc(name: str, lst: list[Any], el: object) -> str:
    i = next(i for i, x in enumerate(lst) if x is el)
    return f"{name}[{i}]"


def _bad(where: str, key: str, value: object, expected: str) -> NoReturn:
    problem = "missing" if value is None else f"{show(value)} is not {expected}"
    raise InvalidLine(f"{where}.{key}: {problem}" if where else f"{key}: {problem}")


def _not_list(where: str, value: object) -> NoReturn:
    raise InvalidLine(f"{where}: {show(value)} is not a list")


def _not_object(where: str, value: object) -> NoReturn:
    raise InvalidLine(f"{where}: {show(value)} is not an object")


def _seg_slow(value: object, where: str, key: str) -> str:
    """An id that is one doc_id segment: non-empty, no ':' and no control character; an integer is fine too."""
    if type(value) is str:
        if value and ":" not in value and _control_search(value) is None:
            return value
    elif type(value) is int:
        return str(value)
    _bad(where, key, value, _SEG_ID)


def _tail_slow(value: object, where: str, key: str) -> str:
    """An id that ends a doc_id, so it may contain ':' (technical ids, user account ids)."""
    if type(value) is str:
        if value and _control_search(value) is None:
            return value
    elif type(value) is int:
        return str(value)
    _bad(where, key, value, _TAIL_ID)


def _device(device: object, name: str, lst: list[Any], el: object) -> dict[str, Any]:
    """A missing device means every device field is null; anything but an object rejects the line."""
    if device is None:
        return {}
    _not_object(f"{_loc(name, lst, el)}.device", device)


def _device_point(el: dict[str, Any], name: str, lst: list[Any], start_ts: int) -> tuple[int, dict[str, Any]]:
    """A user agent's or device's ts (last activity, else creation, else the run's start) and its device info."""
    g = el.get
    creation = g("creation_ts")
    ts = g("last_activity_ts")
    if ts is None:
        ts = start_ts if creation is None else creation
    if type(ts) is not int or ts < 0 or (creation is not None and (type(creation) is not int or creation < 0)):
        _check_ts(el, ("creation_ts", "last_activity_ts"), name, lst)
    d = g("device")
    if type(d) is not dict:
        d = _device(d, name, lst, el)
    d = d.get
    return ts, {
        "$os_family": d("os_family"),
        "$browser_family": d("browser_family"),
        "$form_factor": d("form_factor"),
        "$brand": d("brand"),
        "$model": d("model"),
        "$os_version": d("os_version"),
        "$carrier": d("carrier"),
        "$creation_ts": creation or 0,
    }


def _bad_migration(migrated: object, version: str, new_model: bool, lst: list[Any], el: object) -> NoReturn:
    where = f"{_loc('user_agents', lst, el)}.migrated_to"
    if not new_model:
        raise InvalidLine(
            f"{where}: a {version} datamart has no device points (migration exists from {NEW_DEVICE_MODEL})"
        )
    if type(migrated) is not dict:
        _not_object(where, migrated)
    _bad(where, "user_device_point_id", migrated.get("user_device_point_id"), _UDP_ID)


def _check_ts(el: dict[str, Any], keys: tuple[str, ...], name: str, lst: list[Any]) -> None:
    for key in keys:
        v = el.get(key)
        if v is not None and (type(v) is not int or v < 0):
            _bad(_loc(name, lst, el), key, v, _TS)


def transform_user_point(obj: object, *, system_version: str, start_ts: int) -> list[Message]:
    """All the operations of one user-point export line, in the order of shared/examples/README.md.

    Raises InvalidLine on the first defect, so a rejected line yields nothing. `obj` is consumed: activities lose
    their `$id` (popped rather than copied, since this runs for every activity of the export).
    """
    if type(start_ts) is not int or start_ts < 0:
        raise ValueError(f"start_ts must be a non-negative integer (ms), not {start_ts!r}")
    try:
        return transform(obj, system_version >= NEW_DEVICE_MODEL, system_version, start_ts)
    except orjson.JSONEncodeError as exc:
        raise InvalidLine(f"cannot be serialized ({exc})") from None


def transform(obj: object, new_model: bool, version: str, start_ts: int) -> list[Message]:
    if type(obj) is not dict:
        raise InvalidLine(f"not a JSON object: {show(obj)}")
    get = obj.get
    upid = get("user_point_id")
    if type(upid) is not str or _uuid_match(upid) is None:
        _bad("", "user_point_id", upid, "a UUID")
    ts = get("creation_ts")
    if ts is None:
        ts = start_ts
    elif type(ts) is not int or ts < 0:
        _bad("", "creation_ts", ts, _TS)
    prefix = upid + ":"
    out: list[Message] = [(encode(ts, "UserPoint", upid, _UPDATE, {}), "UserPoint", _UPDATE, upid)]
    add = out.append

    lst = get("accounts")
    if type(lst) is list:
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("accounts", lst, el), el)
            g = el.get
            cid = g("compartment_id")
            if not (type(cid) is str and cid and ":" not in cid and cid.isprintable()):
                cid = _seg_slow(cid, _loc("accounts", lst, el), "compartment_id")
            uaid = g("user_account_id")
            if not (type(uaid) is str and uaid and uaid.isprintable()):
                uaid = _tail_slow(uaid, _loc("accounts", lst, el), "user_account_id")
            ts = g("creation_ts")
            if ts is None:
                ts = start_ts
            elif type(ts) is not int or ts < 0:
                _bad(_loc("accounts", lst, el), "creation_ts", ts, _TS)
            doc_id = f"{prefix}{cid}:{uaid}"
            add((encode(ts, "UserAccount", doc_id, _UPDATE, {}), "UserAccount", _UPDATE, upid))
    elif lst is not None:
        _not_list("accounts", lst)

    lst = get("emails")
    if type(lst) is list:
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("emails", lst, el), el)
            g = el.get
            h = g("hash")
            if not (type(h) is str and h and ":" not in h and h.isprintable()):
                h = _seg_slow(h, _loc("emails", lst, el), "hash")
            email = g("email")
            value = {"$hash": h} if email is None else {"$hash": h, "$email": email}
            ts = g("creation_ts")
            if ts is None:
                ts = start_ts
            elif type(ts) is not int or ts < 0:
                _bad(_loc("emails", lst, el), "creation_ts", ts, _TS)
            add((encode(ts, "UserEmail", prefix + h, _UPDATE, value), "UserEmail", _UPDATE, upid))
    elif lst is not None:
        _not_list("emails", lst)

    lst = get("user_agents")
    if type(lst) is list:
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("user_agents", lst, el), el)
            g = el.get
            vec = g("vector_id")
            if not (type(vec) is str and vec[:4] == "vec:" and vec.isascii() and vec[4:].isdigit()):
                _bad(_loc("user_agents", lst, el), "vector_id", vec, "a vector id (vec:<digits>)")
            ts, info = _device_point(el, "user_agents", lst, start_ts)
            migrated = g("migrated_to")
            if migrated is None:
                add((encode(ts, "UserAgent", prefix + vec, _UPDATE, info), "UserAgent", _UPDATE, upid))
                continue
            udp = migrated.get("user_device_point_id") if type(migrated) is dict else None
            if not new_model or not (
                type(udp) is str
                and udp[:4] == "udp:"
                and udp.isascii()
                and (udp[4:].isdigit() or (udp[4:5] == "-" and udp[5:].isdigit()))
            ):
                _bad_migration(migrated, version, new_model, lst, el)
            udp_id = prefix + udp
            tid = f"{udp_id}:mum:{vec[4:]}"
            add((encode(ts, "UserAgent", prefix + vec, _DELETE, {}), "UserAgent", _DELETE, upid))
            add((encode(ts, "UserDevicePoint", udp_id, _UPDATE, info), "UserDevicePoint", _UPDATE, upid))
            add((encode(ts, "UserDeviceTechnicalId", tid, _UPDATE, {}), "UserDeviceTechnicalId", _UPDATE, upid))
    elif lst is not None:
        _not_list("user_agents", lst)

    lst = get("devices")
    if type(lst) is list:
        if lst and not new_model:
            raise InvalidLine(
                f"devices: a {version} datamart has no device points (they exist from {NEW_DEVICE_MODEL})"
            )
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("devices", lst, el), el)
            g = el.get
            udp = g("id")
            if not (
                type(udp) is str
                and udp[:4] == "udp:"
                and udp.isascii()
                and (udp[4:].isdigit() or (udp[4:5] == "-" and udp[5:].isdigit()))
            ):
                _bad(_loc("devices", lst, el), "id", udp, _UDP_ID)
            udp_id = prefix + udp
            ts, info = _device_point(el, "devices", lst, start_ts)
            add((encode(ts, "UserDevicePoint", udp_id, _UPDATE, info), "UserDevicePoint", _UPDATE, upid))
            tids = g("technical_identifiers")
            if type(tids) is not list:
                if tids is None:
                    continue
                _not_list(f"{_loc('devices', lst, el)}.technical_identifiers", tids)
            for t in tids:
                if type(t) is not dict:
                    _not_object(_loc(f"{_loc('devices', lst, el)}.technical_identifiers", tids, t), t)
                tid = t.get("id")
                if not (type(tid) is str and tid and tid.isprintable()):
                    tid = _tail_slow(tid, _loc(f"{_loc('devices', lst, el)}.technical_identifiers", tids, t), "id")
                ts = t.get("creation_ts")
                if ts is None:
                    ts = start_ts
                elif type(ts) is not int or ts < 0:
                    _bad(_loc(f"{_loc('devices', lst, el)}.technical_identifiers", tids, t), "creation_ts", ts, _TS)
                doc_id = f"{udp_id}:{tid}"
                add((encode(ts, "UserDeviceTechnicalId", doc_id, _UPDATE, {}), "UserDeviceTechnicalId", _UPDATE, upid))
    elif lst is not None:
        _not_list("devices", lst)

    lst = get("profiles")
    if type(lst) is list:
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("profiles", lst, el), el)
            g = el.get
            cid = g("$compartment_id")
            if not (type(cid) is str and cid and ":" not in cid and cid.isprintable()):
                cid = _seg_slow(cid, _loc("profiles", lst, el), "$compartment_id")
            uaid = g("$user_account_id")
            if not (type(uaid) is str and uaid and uaid.isprintable()):
                uaid = _tail_slow(uaid, _loc("profiles", lst, el), "$user_account_id")
            ts = g("$last_modified_ts")
            if ts is None:
                ts = g("$creation_ts")
                if ts is None:
                    ts = start_ts
                elif type(ts) is not int or ts < 0:
                    _bad(_loc("profiles", lst, el), "$creation_ts", ts, _TS)
            elif type(ts) is not int or ts < 0:
                _bad(_loc("profiles", lst, el), "$last_modified_ts", ts, _TS)
            doc_id = f"{prefix}{cid}:{uaid}"
            add((encode(ts, "UserProfile", doc_id, _UPDATE, el), "UserProfile", _UPDATE, upid))
    elif lst is not None:
        _not_list("profiles", lst)

    lst = get("segments")
    if type(lst) is list:
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("segments", lst, el), el)
            g = el.get
            sid = g("segment_id")
            if not (type(sid) is str and sid and ":" not in sid and sid.isprintable()):
                sid = _seg_slow(sid, _loc("segments", lst, el), "segment_id")
            creation = g("creation_ts")
            modified = g("last_modified_ts")
            expiration = g("expiration_ts")
            if (
                (creation is not None and (type(creation) is not int or creation < 0))
                or (modified is not None and (type(modified) is not int or modified < 0))
                or (expiration is not None and (type(expiration) is not int or expiration < 0))
            ):
                _check_ts(el, ("creation_ts", "last_modified_ts", "expiration_ts"), "segments", lst)
            ts = modified if modified is not None else creation if creation is not None else start_ts
            value: dict[str, Any] = {"$creation_ts": creation, "$last_modified_ts": modified}
            if expiration is not None:
                value["$expiration_ts"] = expiration
            add((encode(ts, "UserSegment", prefix + sid, _UPDATE, value), "UserSegment", _UPDATE, upid))
    elif lst is not None:
        _not_list("segments", lst)

    lst = get("activities")
    if type(lst) is list:
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("activities", lst, el), el)
            aid = el.pop("$id", None)
            if not (type(aid) is str and aid and ":" not in aid and aid.isprintable()):
                aid = _seg_slow(aid, _loc("activities", lst, el), "$id")
            ts = el.get("$ts")
            if ts is None:
                ts = start_ts
            elif type(ts) is not int or ts < 0:
                _bad(_loc("activities", lst, el), "$ts", ts, _TS)
            add((encode(ts, "UserActivity", prefix + aid, _UPDATE, el), "UserActivity", _UPDATE, upid))
    elif lst is not None:
        _not_list("activities", lst)

    lst = get("merged_user_point_ids")
    if type(lst) is list:
        for el in lst:
            if type(el) is not dict:
                _not_object(_loc("merged_user_point_ids", lst, el), el)
            merged = el.get("user_point_id")
            if type(merged) is not str or _uuid_match(merged) is None:
                _bad(_loc("merged_user_point_ids", lst, el), "user_point_id", merged, "a UUID")
            ts = el.get("merge_ts")
            if ts is None:
                ts = start_ts
            elif type(ts) is not int or ts < 0:
                _bad(_loc("merged_user_point_ids", lst, el), "merge_ts", ts, _TS)
            value = {"$message": f"{merged} merged with {upid}", "$kept_user_point_id": upid}
            add((encode(ts, "UserPointParent", merged, _UPDATE, value), "UserPointParent", _UPDATE, merged))
    elif lst is not None:
        _not_list("merged_user_point_ids", lst)

    return out
