using Npcd;
using UnityEngine;
using UnityEngine.UI;

/// <summary>A speech bubble that fills as a line's text arrives, then hides a while after
/// the line ends.</summary>
public sealed class SpeechBubble : MonoBehaviour
{
    public Text label;
    public float hideAfterSeconds = 4f;

    NpcdLine shown;

    public void Show(NpcdLine line)
    {
        if (shown != null) Unsubscribe(shown);
        shown = line;
        label.text = string.Empty;
        gameObject.SetActive(true);
        CancelInvoke(nameof(Hide));
        line.TextDelta += OnTextDelta;
        line.Finished += OnFinished;
        line.Failed += OnFailed;
    }

    void OnTextDelta(NpcdLine line, string text)
    {
        label.text = line.Text;
    }

    void OnFinished(NpcdLine line, LineResult result)
    {
        label.text = result.Text;
        Ended(line);
    }

    void OnFailed(NpcdLine line, NpcdError error)
    {
        Debug.LogWarning("npcd line " + line.Id + " failed: " + error);
        Ended(line);
    }

    void Ended(NpcdLine line)
    {
        Unsubscribe(line);
        shown = null;
        Invoke(nameof(Hide), hideAfterSeconds);
    }

    void Unsubscribe(NpcdLine line)
    {
        line.TextDelta -= OnTextDelta;
        line.Finished -= OnFinished;
        line.Failed -= OnFailed;
    }

    void Hide()
    {
        gameObject.SetActive(false);
    }

    void OnDestroy()
    {
        if (shown != null) Unsubscribe(shown);
    }
}
