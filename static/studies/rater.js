// The rater's page: reaction time in the browser, keys A / B / D (and Enter to go on while learning), the
// minimum viewing time of learning examples, and focus / visibility events. Every form also works without it.
(function () {
  "use strict";
  var shownAt = performance.now();
  var timer = null;

  function currentForm() {
    return document.querySelector("form.answer");
  }

  function startTrial() {
    shownAt = performance.now();
    var form = currentForm();
    if (!form) return;
    // Settled: the trial's form is wired to htmx and its timing started (the browser tests wait for it).
    var section = form.closest("section.trial");
    if (section) section.dataset.ready = "1";
    var minMs = parseInt(form.dataset.minMs || "0", 10);
    var next = form.querySelector('button[value="seen"]');
    if (next && minMs > 0) {
      next.disabled = true;
      clearTimeout(timer);
      timer = setTimeout(function () { next.disabled = false; }, minMs);
    }
  }

  function stampReactionTime(button) {
    var field = button.form && button.form.querySelector('input[name="client_rt_ms"]');
    if (field) field.value = String(Math.round(performance.now() - shownAt));
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest('form.answer button[name="answer"]');
    if (button) stampReactionTime(button);
  }, true);

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    var form = currentForm();
    if (!form) return;
    var key = event.key.toLowerCase();
    var value = { a: "A", b: "B", d: "D", enter: "seen", arrowright: "seen" }[key];
    if (!value) return;
    var button = form.querySelector('button[name="answer"][value="' + value + '"]');
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });

  function report(kind) {
    var url = document.body.dataset.events;  // carries the rater's token: no cookie or CSRF token needed
    if (!url || !navigator.sendBeacon) return;
    var data = new FormData();
    data.append("kind", kind);
    data.append("client_ms", String(Math.round(performance.now())));
    var trial = document.querySelector("section.trial");
    if (trial) data.append("trial", trial.dataset.trial);
    navigator.sendBeacon(url, data);
  }

  window.addEventListener("focus", function () { report("focus"); });
  window.addEventListener("blur", function () { report("blur"); });
  document.addEventListener("visibilitychange", function () {
    report(document.visibilityState === "hidden" ? "hidden" : "visible");
  });
  document.addEventListener("DOMContentLoaded", startTrial);
  document.addEventListener("htmx:afterSettle", startTrial);
})();
