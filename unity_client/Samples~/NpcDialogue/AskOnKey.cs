using UnityEngine;

/// <summary>Press the key to ask the NPC a line, and await the whole answer.</summary>
public sealed class AskOnKey : MonoBehaviour
{
    public NpcSpeaker npc;
    public KeyCode key = KeyCode.E;
    public string line = "Any news from the road?";

    async void Update()
    {
        if (!Input.GetKeyDown(key)) return;
        var result = await npc.Answer("Player", line).Completion;
        if (this == null || result.Failed) return;
        Debug.Log(npc.persona + " said: " + result.Text + " (" + result.Reason + ")");
        // a structured line (NpcSpeaker.structured): what the NPC felt and did; result.Json is the whole reply
        if (result.Action != null) Debug.Log(npc.persona + " feels " + result.Emotion + " and does " + result.Action);
    }
}
