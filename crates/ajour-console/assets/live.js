// Keeps the parts of a console page marked `data-live` current: every second it fetches the
// page again and swaps in each live part that changed, by id, without a reload (so focus, the
// scroll position and whatever is typed in a form stay). Stops while the tab is hidden.
(function () {
  "use strict";
  var busy = false;
  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (response) {
        if (response.redirected || !response.ok) return null;
        return response.text();
      })
      .then(function (text) {
        if (!text) return;
        var fresh = new DOMParser().parseFromString(text, "text/html");
        document.querySelectorAll("[data-live][id]").forEach(function (old) {
          var next = fresh.getElementById(old.id);
          if (next && next.innerHTML !== old.innerHTML) old.innerHTML = next.innerHTML;
        });
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }
  window.setInterval(refresh, 1000);
})();
