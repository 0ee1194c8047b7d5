#!/usr/bin/env python3
"""Write-ahead log frames per event in the journal's schema, by b-tree.

Builds the journal's schema from src/journal/schema.rs in a scratch SQLite database, then
writes events the way the agent's writer does (an event row and its body; later its delivery,
its attempt with a 1 KiB applied output and its final state), BATCH events per transaction
with random UUIDv4 ids over 1,000 subjects. For the second half of the events it reads the
write-ahead log's frame headers and names the b-tree each frame's page belongs to (SQLite's
dbstat table). Python's sqlite3 module runs the SQL, so the figures are frames and bytes, not
time.

    python3 bench/journal-frames/frames.py [EVENTS] [BATCH] [PAGE_SIZE]
"""
import collections
import json
import os
import random
import re
import sqlite3
import struct
import sys
import tempfile
import uuid

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
EVENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
BATCH = int(sys.argv[2]) if len(sys.argv) > 2 else 17
PAGE = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
NOW = "2026-12-08T01:00:00.000Z"

schema = open(os.path.join(ROOT, "src/journal/schema.rs")).read()
migrations = re.findall(r'r#"(.*?)"#', schema, re.S)

work = tempfile.mkdtemp()
path = os.path.join(work, "journal.sqlite3")
db = sqlite3.connect(path, isolation_level=None)
db.execute(f"PRAGMA page_size={PAGE}")
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=OFF")
for m in migrations:
    db.executescript(m)
db.execute("PRAGMA wal_autocheckpoint=0")

body = b"x" * 1024
envelope = json.dumps({"data": "y" * 1400})
output = json.dumps({"out": "z" * 900})
waiting = []
measured_from = EVENTS // 2 - (EVENTS // 2) % BATCH
for i in range(EVENTS):
    if i == measured_from:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if i % BATCH == 0:
        db.execute("BEGIN IMMEDIATE")
    db.execute(
        "INSERT INTO events (id, type, version, subject, revision, source, time, format, "
        "content_type, received_at, state, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (str(uuid.uuid4()), "court.calendar.changed", 1, f"subject-{random.randrange(1000)}",
         None, "hub", NOW, "change_event", "application/json", NOW, "accepted", NOW),
    )
    seq = db.execute("SELECT last_insert_rowid()").fetchone()[0]
    db.execute("INSERT INTO event_bodies (seq, raw_body, envelope, receipt) VALUES (?,?,?,?)",
               (seq, body, envelope, '{"auth":"webhook"}'))
    waiting.append(seq)
    # An event is final about one batch after it arrived.
    if len(waiting) > BATCH:
        done = waiting.pop(0)
        db.execute(
            "INSERT INTO deliveries (event_seq, route, sink, state, attempts, updated_at, type) "
            "VALUES (?, 'files', 'files', 'applied', 1, ?, (SELECT type FROM events WHERE seq = ?))",
            (done, NOW, done))
        db.execute(
            "INSERT INTO attempts (event_seq, route, attempt, sink, started_at, duration_ms, "
            "outcome, output, output_bytes) VALUES (?, 'files', 1, 'files', ?, 1, 'applied', ?, ?)",
            (done, NOW, output, len(output)))
        db.execute("UPDATE events SET state = 'applied', finished_at = ?, updated_at = ? "
                   "WHERE seq = ? AND state = 'accepted'", (NOW, NOW, done))
    if i % BATCH == BATCH - 1:
        db.execute("COMMIT")
if db.in_transaction:
    db.execute("COMMIT")

log = open(path + "-wal", "rb").read()
frames = collections.Counter()
offset = 32
while offset + 24 + PAGE <= len(log):
    (page,) = struct.unpack(">I", log[offset:offset + 4])
    frames[page] += 1
    offset += 24 + PAGE
db.execute("PRAGMA wal_checkpoint(PASSIVE)")
owner = {page: name for name, page in db.execute("SELECT name, pageno FROM dbstat")}
by_tree = collections.Counter()
for page, n in frames.items():
    by_tree[owner.get(page, "?")] += n
measured = EVENTS - measured_from
total = sum(frames.values())
print(f"{measured} events, {BATCH} per commit, {PAGE}-byte pages: "
      f"{total / measured:.2f} frames, {total * (PAGE + 24) / measured / 1024:.1f} KiB of log per event")
for name, n in by_tree.most_common():
    print(f"  {name:32s} {n / measured:5.2f} frames per event")
