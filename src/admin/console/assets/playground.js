// The adapter playground: evaluates the script as it is typed with POST /console/eval (the
// agent's own engine and limits) and marks an error at its line and column. With an adapter
// open, its fixtures run on the same script (POST /console/adapters/{name}/fixtures) and each
// case shows as passed, or failed with the diff of expected and actual output. Everything from
// the agent is written with textContent, never as HTML.
"use strict";
(() => {
  const root = document.getElementById("playground");
  if (!root) return;
  const csrf = root.dataset.csrf;
  const $ = (id) => document.getElementById(id);
  const script = $("script"), input = $("input"), event = $("event");
  const output = $("output"), status = $("status"), where = $("error-where");
  const diagnostic = $("diagnostic"), lines = $("lines");
  const adapter = root.dataset.adapter;
  const fixtures = $("fixtures"), fixturesStatus = $("fixtures-status");
  let timer = null, sequence = 0, fixturesSequence = 0, lastOutput, lastInput;
  let urls = [];

  function showLines(errorLine, errorColumn) {
    lines.replaceChildren();
    script.value.split("\n").forEach((text, i) => {
      const li = document.createElement("li");
      li.dataset.line = String(i + 1);
      li.textContent = text === "" ? " " : text;
      if (i + 1 === errorLine) {
        li.className = "error";
        const caret = document.createElement("div");
        caret.className = "caret";
        caret.textContent = " ".repeat(Math.max(0, errorColumn - 1)) + "^";
        li.appendChild(caret);
      }
      lines.appendChild(li);
    });
  }

  // A fixture in the format of an adapter's .tests directory: the chosen event and the output
  // the script gives it now (or that it skips the event).
  function fixtureOf(eventDoc, undefinedResult) {
    const fixture = {
      description: "Built in the console's playground" + (eventDoc && eventDoc.id ? " from event " + eventDoc.id : ""),
      event: eventDoc === undefined ? null : eventDoc,
    };
    if (undefinedResult) fixture.expect_undefined = true;
    else fixture.expect = lastOutput === undefined ? null : lastOutput;
    return fixture;
  }

  function offer(eventDoc, undefinedResult) {
    urls.forEach((u) => URL.revokeObjectURL(u));
    const scriptUrl = URL.createObjectURL(new Blob([script.value], { type: "text/plain" }));
    const fixture = fixtureOf(eventDoc, undefinedResult);
    const fixtureUrl = URL.createObjectURL(new Blob([JSON.stringify(fixture, null, 2) + "\n"], { type: "application/json" }));
    urls = [scriptUrl, fixtureUrl];
    $("fixture").textContent = JSON.stringify(fixture, null, 2);
    $("download-script").href = scriptUrl;
    $("download-fixture").href = fixtureUrl;
  }

  async function post(url, body) {
    try {
      const response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Console-Csrf": csrf },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
      const answer = await response.json();
      return response.ok ? answer : { problem: answer.detail || response.statusText };
    } catch (e) {
      return { problem: "the agent did not answer: " + e.message };
    }
  }

  function showCase(c) {
    const li = document.createElement("li");
    li.className = c.passed ? "pass" : "fail";
    li.dataset.file = c.file || "";
    const head = document.createElement("div");
    const verdict = document.createElement("span");
    verdict.className = c.passed ? "ok" : "bad";
    verdict.textContent = c.passed ? "PASS" : "FAIL";
    const file = document.createElement("code");
    file.textContent = c.file || "";
    head.append(verdict, " ", file, " ", c.description || "");
    li.appendChild(head);
    if (c.failure) {
      const why = document.createElement("pre");
      why.className = "failure";
      why.textContent = c.failure;
      li.appendChild(why);
    }
    if (c.diff) {
      const diff = document.createElement("pre");
      diff.className = "diff";
      c.diff.split("\n").forEach((line) => {
        const span = document.createElement("span");
        span.className = /^(---|\+\+\+) /.test(line) ? "head"
          : line.startsWith("+ ") ? "add" : line.startsWith("- ") ? "del" : "same";
        span.textContent = line + "\n";
        diff.appendChild(span);
      });
      li.appendChild(diff);
    }
    return li;
  }

  async function runFixtures() {
    if (!adapter || !fixtures) return;
    const mine = ++fixturesSequence;
    fixturesStatus.textContent = "running the fixtures…";
    const answer = await post("/console/adapters/" + encodeURIComponent(adapter) + "/fixtures", { script: script.value });
    if (mine !== fixturesSequence) return;
    fixtures.replaceChildren();
    if (answer.problem) {
      fixturesStatus.textContent = answer.problem;
      return;
    }
    if (answer.fixtures.length === 0) {
      fixturesStatus.textContent = `no fixtures: add cases to ${answer.fixtures_dir}/`;
      return;
    }
    fixturesStatus.textContent = `${answer.passed} passed, ${answer.failed} failed (cases in ${answer.fixtures_dir}/)`;
    answer.fixtures.forEach((c) => fixtures.appendChild(showCase(c)));
  }

  async function evaluate() {
    const mine = ++sequence;
    const body = { script: script.value };
    let parsedInput;
    if (event.value.trim() !== "") {
      body.event = event.value.trim();
    } else {
      try {
        parsedInput = JSON.parse(input.value || "null");
        body.input = parsedInput;
      } catch (e) {
        status.textContent = "the input is not JSON: " + e.message;
        return;
      }
    }
    status.textContent = "evaluating…";
    const answer = await post("/console/eval", body);
    if (mine !== sequence) return;
    where.hidden = true;
    diagnostic.hidden = true;
    output.textContent = "";
    if (answer.error) {
      const e = answer.error;
      where.hidden = false;
      where.textContent = e.line ? `line ${e.line}, column ${e.column}: ${e.message}` : e.message;
      where.dataset.line = e.line || "";
      diagnostic.hidden = false;
      diagnostic.textContent = e.diagnostic;
      status.textContent = "error " + e.code;
      showLines(e.line, e.column);
      return;
    }
    showLines(0, 0);
    if (answer.problem) {
      status.textContent = answer.problem;
      return;
    }
    if (answer.undefined) {
      lastOutput = undefined;
      status.textContent = "undefined: the route would skip this event";
      output.textContent = answer.reason || "";
    } else {
      lastOutput = answer.output;
      status.textContent = "ok";
      output.textContent = JSON.stringify(answer.output, null, 2);
    }
    lastInput = "input" in answer ? answer.input : parsedInput;
    offer(lastInput, answer.undefined === true);
  }

  function later() {
    clearTimeout(timer);
    timer = setTimeout(evaluate, 250);
  }
  let fixturesTimer = null;
  function fixturesLater() {
    clearTimeout(fixturesTimer);
    fixturesTimer = setTimeout(runFixtures, 250);
  }
  [script, input, event].forEach((el) => el.addEventListener("input", later));
  // Opening another adapter keeps the event id typed since the page was loaded.
  const keptEvent = document.querySelector("form.filters input[name=event]");
  event.addEventListener("input", () => { if (keptEvent) keptEvent.value = event.value.trim(); });
  script.addEventListener("input", fixturesLater);
  evaluate();
  runFixtures();
})();
