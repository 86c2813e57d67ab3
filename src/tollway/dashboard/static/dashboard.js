// Copy buttons: a <button data-copy="ID" hidden> copies the value of #ID. Without
// JavaScript the button stays hidden and the field can be selected and copied by hand.
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  var field = document.getElementById(button.getAttribute("data-copy"));
  if (!field || !navigator.clipboard) { return; }
  button.hidden = false;
  button.addEventListener("click", function () {
    navigator.clipboard.writeText(field.value).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 2000);
    });
  });
});
document.querySelectorAll("input[readonly]").forEach(function (field) {
  field.addEventListener("focus", function () { field.select(); });
});
