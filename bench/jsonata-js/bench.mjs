// The jsonata-js side of the adapter benchmark (benches/adapters.rs writes the cases).
// For each case: compile the script once, then time parse (JSON.parse of the input text),
// evaluate, and serialise (JSON.stringify of the result), as the agent does per event.
import { readFileSync } from "node:fs";
import jsonata from "jsonata";

const [casesFile, roundsArg, itersArg] = process.argv.slice(2);
const cases = JSON.parse(readFileSync(casesFile, "utf8"));
const rounds = Number(roundsArg);
const iters = Number(itersArg);
const results = [];
for (const c of cases) {
  const expr = jsonata(c.source);
  const perRound = [];
  for (let r = 0; r < rounds; r++) {
    const start = process.hrtime.bigint();
    for (let i = 0; i < iters; i++) {
      const input = JSON.parse(c.input_text);
      const out = await expr.evaluate(input, c.bindings);
      JSON.stringify(out);
    }
    const ns = Number(process.hrtime.bigint() - start);
    perRound.push(ns / iters / 1000);
  }
  results.push({ name: c.name, micros_per_event: perRound });
}
console.log(JSON.stringify(results));
