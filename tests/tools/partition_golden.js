// Golden key → partition rows for tests/test_partitions.py, computed by the official JavaScript Event Hubs SDK
// (@azure/event-hubs: mapPartitionKeyToId / hashPartitionKey, its port of the service's partition hash), so that
// dmrepl.partitions is checked against an implementation we did not write.
//
// Regenerate (the SDK stays outside the repository; keys are seeded, so the output only changes with the SDK):
//   mkdir -p /tmp/ehgolden && npm --prefix /tmp/ehgolden install @azure/event-hubs@6.0.4
//   NODE_PATH=/tmp/ehgolden/node_modules node tests/tools/partition_golden.js > tests/data/eventhubs-partitions.golden.ndjson
//
// Output (NDJSON): a header object {sdk, version, partition_counts, rows}, then one row per key:
// [key, hash, [partition for each of partition_counts]].
"use strict";

const path = require("path");

const pkgJson = require.resolve("@azure/event-hubs/package.json");
const { version } = require(pkgJson);
// Not exported by the package's "exports" map, hence the file path; partitionAssigner.js uses it for keyed sends.
const mapper = require(path.join(path.dirname(pkgJson), "dist/commonjs/impl/partitionKeyToIdMapper.js"));

const PARTITION_COUNTS = [1, 2, 3, 4, 7, 32, 100];

function mulberry32(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const rand = mulberry32(20240601);
const int = (n) => Math.floor(rand() * n);
const pick = (items) => items[int(items.length)];

function uuid4() {
  const hex = Array.from({ length: 32 }, () => int(16).toString(16));
  hex[12] = "4";
  hex[16] = "89ab"[int(4)];
  const s = hex.join("");
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`;
}

const ASCII = Array.from({ length: 95 }, (_, i) => String.fromCharCode(32 + i));
const NON_ASCII = [
  ..."éèêëàâäçñøåßÉÀÇÑØÅıİœŒ", // Latin-1 and Latin Extended: 2 bytes
  ..."αβγδΩжЖщЯאבשعربيहिन्दी", // Greek, Cyrillic, Hebrew, Arabic, Devanagari
  ..."数据集市分区東京漢字한국어ひらがなカタカナ", // CJK: 3 bytes
  "\u0301", "\u0308", "\u0327", "\u200d", "\ufeff", "\u00a0", "\u0000", // combining marks, ZWJ, BOM, NBSP, NUL
  "😀", "🎉", "👍🏽", "👨‍👩‍👧", "🇫🇷", "𝔘", "𠜎", // astral: 4 bytes, surrogate pairs in UTF-16
];

function randomKey(pool, length) {
  return Array.from({ length }, () => pick(pool)).join("");
}

const keys = [];
const seen = new Set();
const add = (key) => {
  if (!seen.has(key)) {
    seen.add(key);
    keys.push(key);
  }
};

// The .NET SDK's published vectors, and the empty key.
for (const key of [
  "7", "131", "7149583486996073602", "FWfAT", "sOdeEAsyQoEuEFPGerWO",
  "FAyAIctPeCgmiwLKbJcyswoHglHVjQdvtBowLACDNORsYvOcLddNJYDmhAVkbyLOrHTKLneMNcbgWVlasVywOByANjs",
  "1XYM6!(7(lF5wq4k4m*e$Nc!1ezLJv*1YK1Y-C^*&B$O)lq^iUkG(TNzXG;Zi#z2Og*Qq0#^*k):vXh$3,C7We7%W0meJ;b3,rQCg^J;^twXgs5E$$hWKxqp",
  "E(x;RRIaQcJs*P;D&jTPau-4K04oqr:lF6Z):ERpo&;9040qyV@G1_c9mgOs-8_8/10Fwa-7b7-yP!T-!IH&968)FWuI;(^g$2fN;)HJ^^yTn:",
  "!c*_!I@1^c", "p4*!jioeO/z-!-;w:dh", "$0cb", "-4189260826195535198", "",
]) {
  add(key);
}
// Every tail length (lookup3 reads 12-byte blocks), several times each.
for (let length = 1; length <= 48; length++) {
  for (let i = 0; i < 5; i++) add(randomKey(ASCII, length));
}
for (let i = 0; i < 8000; i++) add(uuid4());
// Non-ASCII: mixed with ASCII and pure, NFC and NFD forms of the same text.
for (let i = 0; i < 1400; i++) add(randomKey(i % 2 ? NON_ASCII : [...ASCII, ...NON_ASCII], 1 + int(40)));
for (const word of ["café", "naïve", "Ångström", "señor", "Straße", "日本語", "über"]) {
  add(word.normalize("NFC"));
  add(word.normalize("NFD"));
}
// Lone surrogates: the SDK's UTF-8 encoder writes U+FFFD for each.
for (const key of ["\ud800", "\udfff", "a\ud83d", "\ude00b", "x\ud83d\ud83dy", "\ude00\ud83d"]) add(key);
// Uppercase UUIDs and UUIDs wrapped in spaces: the service does not normalise keys.
for (let i = 0; i < 300; i++) add(i % 2 ? uuid4().toUpperCase() : ` ${uuid4()} `);
// Long keys: 1 KiB and more.
for (let i = 0; i < 40; i++) add(randomKey(i % 4 ? ASCII : [...ASCII, ...NON_ASCII], 1024 + int(3072)));
for (const length of [255, 256, 257, 1023, 1024, 1025, 4096]) add("k".repeat(length));

const lines = [
  JSON.stringify({
    sdk: "@azure/event-hubs",
    version,
    functions: "mapPartitionKeyToId, hashPartitionKey",
    partition_counts: PARTITION_COUNTS,
    rows: keys.length,
  }),
];
for (const key of keys) {
  const row = [key, mapper.hashPartitionKey(key), PARTITION_COUNTS.map((n) => mapper.mapPartitionKeyToId(key, n))];
  lines.push(JSON.stringify(row));
}
process.stdout.write(lines.join("\n") + "\n");
