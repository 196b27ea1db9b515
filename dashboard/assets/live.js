// Live updates for the chunkwise dashboard. The server sends a "change" event (with a
// version number) whenever what the views show has changed; the page then fetches
// itself again and swaps its <main> for the new one. What is swapped in is the server's
// own escaped HTML; nothing from the event is put into the page.
(function () {
  "use strict";
  var body = document.body;
  var shown = body.dataset.version;
  if (!body.dataset.events || !window.EventSource || !window.fetch) {
    return;
  }
  var busy = false;
  var again = false;

  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) { return response.text(); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var main = fresh.querySelector("main");
        if (main) {
          document.querySelector("main").replaceWith(document.adoptNode(main));
          shown = fresh.body.dataset.version;
        }
      })
      .catch(function () { /* the dashboard is away; the next event tries again */ })
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }

  var events = new EventSource(body.dataset.events);
  events.addEventListener("change", function (event) {
    var pulse = JSON.parse(event.data);
    if (String(pulse.version) !== shown) {
      refresh();
    }
  });
  events.addEventListener("open", function () { body.classList.remove("offline"); });
  events.addEventListener("error", function () { body.classList.add("offline"); });
})();
