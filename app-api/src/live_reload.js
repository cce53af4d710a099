// Injected by app-api into the app's HTML pages while the host runs with --live-reload.
// The event stream it opens says which generation answers it. A generation ends its streams
// when a newer one takes over; the browser then reconnects, to the newer one, whose number is
// higher than that of the generation that served this page: the page is out of date. (An
// older one may still answer for a while, during a canary: it is no reason to reload.)
(() => {
  const shown = Number(document.currentScript.dataset.generation);
  const events = new EventSource("/_hot_reload/events");
  events.onmessage = (message) => {
    if (Number(message.data) > shown) {
      events.close();
      location.reload();
    }
  };
})();
