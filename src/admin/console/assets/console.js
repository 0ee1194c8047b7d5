// The console's shared script: small conveniences only; every page reads without it.
"use strict";
document.addEventListener("keydown", (e) => {
  // "/" jumps to the event search, as on many log viewers.
  const search = document.getElementById("f-id");
  if (e.key === "/" && search && document.activeElement.tagName !== "INPUT" &&
      document.activeElement.tagName !== "TEXTAREA") {
    e.preventDefault();
    search.focus();
  }
});
