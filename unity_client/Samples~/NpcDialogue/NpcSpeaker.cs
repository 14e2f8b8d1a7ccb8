using Npcd;
using UnityEngine;

/// <summary>An NPC that says lines of its persona. A line still streaming when the
/// GameObject is destroyed (or a new line starts) is cancelled.</summary>
public sealed class NpcSpeaker : MonoBehaviour
{
    public string persona = "town_guard";
    public string npcId = "guard-1";
    public SpeechBubble bubble;

    NpcdLine current;

    /// <summary>Asks the NPC to answer `line`; the bubble fills as the text arrives.</summary>
    public NpcdLine Answer(string speaker, string line)
    {
        CancelCurrent();
        var request = new LineRequest(persona, line) { Speaker = speaker, NpcId = npcId, Priority = Priority.Player };
        request.Context["location"] = gameObject.scene.name;
        current = NpcdConnection.Instance.Client.Say(request);
        if (bubble != null) bubble.Show(current);
        return current;
    }

    void CancelCurrent()
    {
        if (current != null && !current.IsDone) current.Cancel();
        current = null;
    }

    void OnDestroy()
    {
        if (NpcdConnection.Instance != null) CancelCurrent();
    }
}
