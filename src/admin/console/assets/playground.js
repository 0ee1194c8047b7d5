// The adapter playground: evaluates the script as it is typed with POST /console/eval (the
// agent's own engine and limits) and marks an error at its line and column.
"use strict";
(() => {
  const root = document.getElementById("playground");
  if (!root) return;
  const csrf = root.dataset.csrf;
  const $ = (id) => document.getElementById(id);
  const script = $("script"), input = $("input"), event = $("event");
  const output = $("output"), status = $("status"), where = $("error-where");
  const diagnostic = $("diagnostic"), lines = $("lines");
  let timer = null, sequence = 0, lastOutput;
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

  function offer(parsedInput) {
    urls.forEach((u) => URL.revokeObjectURL(u));
    const scriptUrl = URL.createObjectURL(new Blob([script.value], { type: "text/plain" }));
    const fixture = { input: parsedInput === undefined ? null : parsedInput, output: lastOutput === undefined ? null : lastOutput };
    const fixtureUrl = URL.createObjectURL(new Blob([JSON.stringify(fixture, null, 2) + "\n"], { type: "application/json" }));
    urls = [scriptUrl, fixtureUrl];
    $("download-script").href = scriptUrl;
    $("download-fixture").href = fixtureUrl;
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
    let answer;
    try {
      const response = await fetch("/console/eval", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Console-Csrf": csrf },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
      answer = await response.json();
      if (!response.ok) {
        answer = { problem: answer.detail || response.statusText };
      }
    } catch (e) {
      answer = { problem: "the agent did not answer: " + e.message };
    }
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
    offer(parsedInput);
  }

  function later() {
    clearTimeout(timer);
    timer = setTimeout(evaluate, 250);
  }
  [script, input, event].forEach((el) => el.addEventListener("input", later));
  evaluate();
})();
