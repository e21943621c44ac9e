// The search form: a visible "Searching..." status (announced by screen readers) while the model
// works; a live label for the words/picture slider; a chosen picture or a slider moved by pointer runs
// the search again.  Moved by keyboard, the slider waits for Enter, so arrow keys do not reload the page.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector(".mapclip-form");
  if (!form) return;
  const status = form.querySelector(".mapclip-status");
  const main = document.querySelector(".mapclip");
  const searching = () => {
    form.classList.add("mapclip-searching");
    if (main) main.setAttribute("aria-busy", "true");
    if (status) status.textContent = "Searching\u2026 the model is comparing your search with every map.";
  };
  const search = () => {
    if (form.requestSubmit) form.requestSubmit(); else { searching(); form.submit(); }
  };
  form.addEventListener("submit", searching);
  // Back from the next page (bfcache): no stale "Searching..."
  window.addEventListener("pageshow", () => {
    form.classList.remove("mapclip-searching");
    if (main) main.removeAttribute("aria-busy");
    if (status) status.textContent = "";
  });
  // More terms: each weight shows its value; "Add another term" copies the empty row (without
  // script, one new term can be added per search).
  const showWeight = (range) => {
    const out = range.closest(".mapclip-term").querySelector(".mapclip-term-weight");
    const v = parseFloat(range.value);
    if (out) out.textContent = (v >= 0 ? "+" : "") + v.toFixed(1);
  };
  form.querySelectorAll(".mapclip-term input[type=range]").forEach((range) => range.addEventListener("input", () => showWeight(range)));
  const add = form.querySelector(".mapclip-add-term");
  const list = form.querySelector(".mapclip-term-list");
  const blank = form.querySelector(".mapclip-term-new");
  if (add && list && blank) {
    add.hidden = false;
    add.addEventListener("click", () => {
      if (list.children.length >= 12) { add.hidden = true; return; }
      const row = blank.cloneNode(true);
      const n = list.children.length + 1;
      row.querySelector("input[type=text]").value = "";
      row.querySelector("input[type=range]").value = "1";
      row.querySelectorAll("label")[0].firstChild.textContent = "Term " + n + " ";
      row.querySelectorAll("label")[1].firstChild.textContent = "Weight of term " + n + " ";
      row.querySelector(".mapclip-term-weight").textContent = "+1.0";
      row.querySelector("input[type=range]").addEventListener("input", (event) => showWeight(event.target));
      list.appendChild(row);
      row.querySelector("input[type=text]").focus();
      if (list.children.length >= 12) add.hidden = true;
    });
  }
  document.querySelectorAll(".mapclip-examples a, .mapclip-more, .mapclip-pages a, .mapclip-mark a").forEach((link) => {
    link.addEventListener("click", (event) => {
      if (!event.defaultPrevented && event.button === 0 && !event.metaKey && !event.ctrlKey && !event.shiftKey) searching();
    });
  });

  const slider = form.querySelector("input[name=weight]");
  const output = form.querySelector(".mapclip-weight-value");
  if (slider) {
    let byKeyboard = false;
    const show = () => {
      const v = parseFloat(slider.value);
      const text = (v >= 0 ? "+" : "") + v.toFixed(1);
      if (output) output.textContent = text;
      slider.setAttribute("aria-valuetext", text + (v <= -1 ? " (picture only)" : v >= 1 ? " (words only)" : ""));
    };
    slider.addEventListener("input", show);
    slider.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); search(); return; }
      byKeyboard = true;
    });
    slider.addEventListener("pointerdown", () => { byKeyboard = false; });
    slider.addEventListener("change", () => {
      if (byKeyboard) {
        if (status) status.textContent = "Press Enter, or the Search button, to search with the new mix.";
        return;
      }
      search();
    });
  }
  // A search opens on its answer, at every width: the error, else the results' heading, comes into
  // view and takes focus (on a phone the form alone fills the first screen; a keyboard user's next Tab
  // is then the first result, not the whole form again).  The empty page keeps the search box focused.
  const answer = document.querySelector(".mapclip-error") ||
    (location.search ? document.getElementById("mapclip-results-heading") : null);
  if (answer && !window.__mapclipAnswered) {
    window.__mapclipAnswered = true;
    answer.setAttribute("tabindex", "-1");
    answer.scrollIntoView({block: "start"});
    answer.focus({preventScroll: true});
  }
  const file = form.querySelector("input[type=file]");
  if (file) {
    file.addEventListener("change", () => {
      if (!file.files || !file.files.length) return;
      // a new picture replaces the previous image query
      form.querySelectorAll("input[name=like], input[name=vector]").forEach((el) => el.remove());
      search();
    });
  }
});
