// Live label for the weight slider; moving it or choosing an image runs the search again.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector(".mapclip-form");
  if (!form) return;
  const slider = form.querySelector("input[name=weight]");
  const output = form.querySelector(".mapclip-weight-value");
  const show = () => { const v = parseFloat(slider.value); output.textContent = (v >= 0 ? "+" : "") + v.toFixed(1); };
  slider.addEventListener("input", show);
  slider.addEventListener("change", () => form.submit());
  form.querySelector("input[type=file]").addEventListener("change", () => {
    // a new picture replaces the previous image query
    form.querySelectorAll("input[name=like], input[name=vector]").forEach((el) => el.remove());
    form.submit();
  });
});
