// Injected by app-api into the app's HTML pages while the host runs with --live-reload.
// The event stream it opens says which host process and generation answer it. A generation
// ends its streams when a newer one takes over; the browser then reconnects, to the newer one,
// whose number is higher than that of the generation that served this page: the page is out of
// date. (An older one may still answer for a while, during a canary: no reason to reload.)
// Another host process numbers its generations anew: any of its generations is newer.
(() => {
  const [host, generation] = document.currentScript.dataset.served.split(" ").map(Number);
  const events = new EventSource("/_hot_reload/events");
  events.onmessage = (message) => {
    const [answering, serving] = message.data.split(" ").map(Number);
    if (answering !== host || serving > generation) {
      events.close();
      location.reload();
    }
  };
})();
