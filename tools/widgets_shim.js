// Loaded between require.js and the ipywidgets HTML manager on every page with widgets (see _config.yml).
(function () {
  // 1. The manager's CSS names its icon fonts relative to its require.js module path, which by default resolves
  //    to <page folder>/@jupyter-widgets/html-manager/dist/ and 404s: point it at _static/html-manager/.
  var staticRoot = document.currentScript.src.replace(/[^/]*$/, "");
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": staticRoot + "html-manager" } });

  // 2. The manager typesets widget labels with MathJax 2's MathJax.Hub.Queue whenever window.MathJax exists; the
  //    book loads MathJax 3, which has no Hub, and replaces window.MathJax when it starts. Keep a Hub.Queue on
  //    whatever window.MathJax becomes, forwarding to MathJax 3's typesetPromise once that is ready.
  var hub = {
    Queue: function (job) {
      var mathjax = window.MathJax;
      if (mathjax && mathjax.typesetPromise) mathjax.typesetPromise(job && job[2] ? [job[2]] : undefined);
    },
  };
  var current = window.MathJax || {};
  current.Hub = current.Hub || hub;
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: function () { return current; },
    set: function (value) { current = value; if (value && !value.Hub) value.Hub = hub; },
  });
})();
